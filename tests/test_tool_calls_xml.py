"""Qwen3.5's XML tool calls: what its released template writes parses back, two calls, malformed blocks kept, JSON as before.

The template (run through the tiny-qwen3.5 replica's tokenizer) writes ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\n
VALUE\\n</parameter>\\n</function>\\n</tool_call>``: objects and lists as ``tojson``, numbers and bools as Python's ``str``.
"""

import pytest

from qwen_helpers.data.records import load_records
from qwen_helpers.data.tool_calls import parse_parameter_value, parse_tool_calls, reference_tool_calls, tool_calls_match
from qwen_helpers.models.loading import load_tokenizer

from conftest import DATA

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city for some days",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
ARGUMENTS = {"city": "Paris", "days": 3, "options": {"units": "metric", "hours": [6, 12], "alerts": True}}
XML_CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-qwen3.5")


def generated_part(tokenizer, calls: list[dict], content: str = "") -> str:
    """What the model would generate for an assistant turn with these calls: the template's last assistant turn, bare."""
    messages = [{"role": "user", "content": "Weather in Paris and Tokyo?"}, {"role": "assistant", "content": content, "tool_calls": calls}]
    text = tokenizer.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
    answer = text.rsplit("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    return answer.split("</think>", 1)[-1].lstrip("\n")  # the template's empty think block


def function_call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# ------------------------------------------------------------------------------------------ the released template, rendered and parsed back


def test_a_call_the_template_writes_parses_back_to_its_name_and_arguments(tokenizer):
    answer = generated_part(tokenizer, [function_call("get_weather", ARGUMENTS)])
    assert answer.startswith(XML_CALL.removesuffix("</function>\n</tool_call>"))  # the XML form, not hermes JSON
    assert '<parameter=options>\n{"units": "metric", "hours": [6, 12], "alerts": true}\n</parameter>' in answer
    assert parse_tool_calls(answer) == ("", [{"name": "get_weather", "arguments": ARGUMENTS}])
    assert type(parse_tool_calls(answer)[1][0]["arguments"]["days"]) is int


def test_every_kind_of_value_the_template_writes_round_trips(tokenizer):
    arguments = {"flag": False, "nothing": None, "ratio": 0.5, "big": 1e20, "negative": -2, "tags": ["x", 1], "empty": "",
                 "lines": "one\ntwo", "padded": "\n  kept  \n", "word_true": "true", "zip": "007", "spaced": " 3", "quoted": '"q"',
                 "markup": "a <b> </c>", "name_like_constant": "Infinity"}
    answer = generated_part(tokenizer, [function_call("get_weather", arguments)])
    assert "<parameter=flag>\nFalse\n</parameter>" in answer and "<parameter=big>\n1e+20\n</parameter>" in answer  # Python's str
    (call,) = parse_tool_calls(answer)[1]
    assert call["arguments"] == arguments
    assert {key: type(value) for key, value in call["arguments"].items()} == {key: type(value) for key, value in arguments.items()}


def test_a_string_argument_that_reads_as_a_number_comes_back_as_the_number(tokenizer):
    """The documented ambiguity: the template writes the string "3" and the integer 3 the same way."""
    as_string, as_number = (generated_part(tokenizer, [function_call("get_weather", {"days": days})]) for days in ("3", 3))
    assert as_string == as_number
    assert parse_tool_calls(as_string)[1] == [{"name": "get_weather", "arguments": {"days": 3}}]
    assert [parse_parameter_value(value) for value in ("True", "[1]", "1.5", "true", "null", "NaN", "3 ")] == [True, [1], 1.5, "true", "null", "NaN", "3 "]


def test_two_calls_in_one_answer_parse_in_order_and_leave_the_text(tokenizer):
    calls = [function_call("get_weather", {"city": "Paris", "days": 3}), function_call("get_weather", {"city": "东京"})]
    answer = generated_part(tokenizer, calls, content="Let me check both.")
    assert answer.count("<tool_call>") == 2 and answer.startswith("Let me check both.\n\n<tool_call>")
    assert parse_tool_calls(answer) == ("Let me check both.", [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
                                                                {"name": "get_weather", "arguments": {"city": "东京"}}])


def test_an_xml_and_a_json_block_in_one_answer_both_parse():
    json_block = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    assert parse_tool_calls(XML_CALL + "\n" + json_block) == ("", [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
                                                                   {"name": "get_time", "arguments": {"zone": "CET"}}])


# ------------------------------------------------------------------------------------------ malformed blocks


@pytest.mark.parametrize("block", [
    "<tool_call>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\ncity: Paris\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n</function>\nand more\n</tool_call>",
    "<tool_call>\n<function=>\n</function>\n</tool_call>",
], ids=["no-function", "function-not-closed", "parameter-not-closed", "parameter-left-open-before-the-next", "text-not-parameter",
        "text-after-function", "empty-name"])
def test_a_malformed_xml_block_stays_in_the_text_and_the_good_one_beside_it_parses(block):
    assert parse_tool_calls(block) == (block, [])
    assert parse_tool_calls("Checking.\n" + block + "\n" + XML_CALL) == ("Checking.\n" + block, [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}])


# ------------------------------------------------------------------------------------------ the JSON form, as before


def test_the_json_form_parses_as_before():
    json_block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "<function=x>", "days": "3"}}\n</tool_call>'
    assert parse_tool_calls("Sure.\n" + json_block) == ("Sure.", [{"name": "get_weather", "arguments": {"city": "<function=x>", "days": "3"}}])
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])


# ------------------------------------------------------------------------------------------ what trains on tiny-qwen3.5


def test_inspect_record_trains_the_xml_call_and_its_trained_text_parses_to_the_reference(tokenizer):
    from qwen_helpers.inspect_data import inspect_record

    records = [record for record in load_records(DATA / "tools.json") if record.get("tool_calls")]
    assert records
    for record in records:
        view = inspect_record(tokenizer, record)
        assert "<function=" in view["trained_text"] and view["trained_text"].endswith("<|im_end|>")
        assert "<function=" not in view["prompt"].rsplit("<|im_start|>assistant\n", 1)[1]  # the call is the answer, not the prompt
        call = view["trained_text"].split("<|im_end|>")[0]  # the first trained turn: the answer's call
        assert tool_calls_match(parse_tool_calls(call)[1], reference_tool_calls(record)), (call, reference_tool_calls(record))
