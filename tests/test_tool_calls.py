"""Tool-calling conversations: validation, what trains on the released templates, batched = per record, parsing, metric, end to end.

The trained-text tests run on the replicas of Qwen2.5-Instruct and Qwen3 (their released chat templates render
the tools block in the system turn, ``<tool_call>`` blocks in assistant turns and ``<tool_response>`` in a user turn).
"""

import json

import pytest

from qwen_helpers.data.encoding import IGNORE_INDEX, format_prompt, tokenize_example, tokenize_prompt, tokenize_records
from qwen_helpers.evaluation.metrics import scores_by_task, tool_call_exact_match
from qwen_helpers.models.loading import load_tokenizer
from qwen_helpers.data.records import DataValidationError, load_records
from qwen_helpers.data.tool_calls import parse_tool_calls

from conftest import DATA

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
RESULT = '{"city": "北京", "temperature_c": 3}'
CONVERSATION = [{"role": "system", "content": "You help with the weather."}, {"role": "user", "content": "北京天气怎么样？"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": RESULT},
                {"role": "assistant", "content": "北京现在3°C。"}]
RECORD = {"messages": CONVERSATION, "tools": [WEATHER]}
SHAREGPT = {"conversations": [{"from": "system", "value": "You help with the weather."}, {"from": "human", "value": "北京天气怎么样？"},
                              {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}}, ensure_ascii=False)},
                              {"from": "observation", "value": RESULT}, {"from": "gpt", "value": "北京现在3°C。"}],
            "tools": json.dumps([WEATHER["function"]])}  # LLaMA-Factory: bare function specs, as a JSON string
INSTRUCT_REPLICAS = ["tiny-qwen2.5-instruct", "tiny-qwen3"]


def with_turn(position: int, **changes) -> dict:
    turns = [dict(turn) for turn in CONVERSATION]
    turns[position].update(changes)
    return {"messages": turns, "tools": [WEATHER]}


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([token for token in example["labels"] if token != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("record, message", [
    (with_turn(2, tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": 北京}'}}]),
     r"tools\.jsonl, record 0, turn 2, tool call 0: 'arguments' is not valid JSON"),
    (with_turn(2, tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}]),
     r"record 0, turn 2, tool call 0: 'arguments' must be a JSON object"),
    (with_turn(2, tool_calls=[{"type": "function", "function": {"arguments": {}}}]), r"record 0, turn 2, tool call 0: a tool call needs"),
    (with_turn(2, tool_calls=[]), r"record 0, turn 2: 'tool_calls' must be a non-empty list"),
    ({"messages": CONVERSATION, "tools": [{"name": "get_weather"}]}, r"record 0, field 'tools': tools\[0\] must be"),
    ({"messages": CONVERSATION, "tools": "[not json"}, r"record 0, field 'tools': 'tools' is a string but not valid JSON"),
    ({"messages": [CONVERSATION[1], CONVERSATION[3], CONVERSATION[4]]}, r"record 0: turn order user -> tool -> assistant cannot be rendered"),
    ({"messages": CONVERSATION[:3] + CONVERSATION[4:]}, r"record 0: turn order system -> user -> assistant -> assistant"),
    ({"conversations": [SHAREGPT["conversations"][1], {"from": "function_call", "value": "{get_weather"}]},
     r"record 0, turn 1: the function_call value is not valid JSON"),
    (with_turn(1, tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]),
     r"record 0, turn 1: a user turn has 'tool_calls', but only the assistant calls tools"),
], ids=["malformed-arguments", "arguments-not-object", "no-name", "empty-calls", "tool-spec", "tools-string", "tool-without-call",
        "call-without-result", "sharegpt-call", "user-calls"])
def test_bad_tool_records_get_one_line_naming_file_record_and_turn(tmp_path, record, message):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=message) as error:
        load_records(path)
    assert "\n" not in str(error.value)


def test_inspect_data_refuses_a_malformed_call_in_one_line_before_loading_a_model(tmp_path, capsys):
    from qwen_helpers import inspect_data

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(with_turn(2, tool_calls=[{"function": {"name": "f", "arguments": "{oops"}}])) + "\n", encoding="utf-8")
    assert inspect_data.main(["--data_path", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "bad.jsonl, record 0, turn 2, tool call 0" in error


def test_answers_that_call_tools_are_never_taken_for_classification_labels():
    from qwen_helpers.data.records import detect_task

    records = load_records([{"messages": CONVERSATION[:3], "tools": [WEATHER]}] * 4)
    assert detect_task(records) == "generation"
    assert detect_task([{"output": record["output"]} for record in records]) == "generation"  # as the commands stream them


def test_records_keep_the_answers_calls_and_the_tools():
    (answer_is_call,) = load_records([{"messages": CONVERSATION[:3], "tools": [WEATHER]}])
    assert answer_is_call["output"] == "" and answer_is_call["tool_calls"] == [CALL] and answer_is_call["tools"] == [WEATHER]
    (sharegpt,) = load_records([SHAREGPT])
    (messages,) = load_records([RECORD])
    assert sharegpt["messages"] == messages["messages"] and sharegpt["tools"] == messages["tools"]
    assert messages["messages"][2]["tool_calls"] == [CALL] and messages["messages"][3] == {"role": "tool", "content": RESULT}


# ------------------------------------------------------------------------------------------ rendering and trained tokens


@pytest.fixture(scope="module", params=INSTRUCT_REPLICAS)
def replica(request):
    return request.param, load_tokenizer(request.param)


def test_a_template_without_tool_calls_is_refused_naming_the_record(tmp_path):
    from qwen_helpers.data.loading import load_dataset_for_training

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"tools\.jsonl, record 0: The chat template does not render the tool calls of turn 2"):
        load_dataset_for_training(load_tokenizer("tiny-qwen1.5-chat"), path, max_length=1024, cache_dir=str(tmp_path), echo=lambda _: None)


def test_string_and_object_arguments_give_the_same_tokens(replica):
    _, tokenizer = replica
    as_string = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "北京"}, ensure_ascii=False)}}
    (objects,), (strings,) = load_records([RECORD]), load_records([with_turn(2, tool_calls=[as_string])])
    assert tokenize_example(tokenizer, strings) == tokenize_example(tokenizer, objects)
    assert CALL_TEXT in tokenizer.decode(tokenize_example(tokenizer, strings)["input_ids"])  # not a quoted JSON string


def test_inspect_data_json_trains_the_calls_and_answers_only(replica, tmp_path, capsys):
    from qwen_helpers import inspect_data

    name, tokenizer = replica
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n", encoding="utf-8")
    assert inspect_data.main(["--model_path", name, "--data_path", str(path), "--json", "True"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["trained_text"] == CALL_TEXT + "<|im_end|>" + "北京现在3°C。<|im_end|>"  # each assistant turn and its <|im_end|>
    assert "<tools>" in view["text"] and "<tool_response>\n" + RESULT in view["text"]  # the template's tools block and result turn
    trained = [token for token in view["labels"] if token != IGNORE_INDEX]
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in trained
    assert tokenizer.convert_tokens_to_ids("<tool_response>") not in trained and "temperature_c" not in view["trained_text"]


def test_sharegpt_function_call_trains_as_the_messages_form(replica):
    _, tokenizer = replica
    (sharegpt,), (messages,) = load_records([SHAREGPT]), load_records([RECORD])
    assert tokenize_example(tokenizer, sharegpt) == tokenize_example(tokenizer, messages)


def test_the_prompt_renders_the_tools_and_is_the_start_of_the_training_tokens(replica):
    name, tokenizer = replica
    (record,) = load_records([RECORD])
    prompt = format_prompt(tokenizer, record)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt  # the tools block, in the system turn
    assert CALL_TEXT + "<|im_end|>" in prompt  # the earlier call, as training renders it
    example, prompt_ids = tokenize_example(tokenizer, record), tokenize_prompt(tokenizer, record)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode([t for t in example["labels"][len(prompt_ids):] if t != IGNORE_INDEX]) == "北京现在3°C。<|im_end|>"


def test_an_answer_with_text_and_two_calls_trains_all_of_it(replica):
    _, tokenizer = replica
    paris = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    (record,) = load_records([{"messages": [CONVERSATION[1], {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, paris]}],
                               "tools": [WEATHER]}])
    expected = "Let me check.\n" + CALL_TEXT + "\n" + CALL_TEXT.replace("北京", "Paris") + "<|im_end|>"
    assert trained_text(tokenizer, tokenize_example(tokenizer, record)) == expected


def test_truncate_prompt_drops_a_whole_exchange_with_its_call_and_result(replica):
    _, tokenizer = replica
    long_result = json.dumps({"city": "北京", "forecast": ["晴"] * 200}, ensure_ascii=False)
    turns = [*CONVERSATION[:3], {"role": "tool", "content": long_result}, CONVERSATION[4],
             {"role": "user", "content": "谢谢！"}, {"role": "assistant", "content": "不客气。"}]
    (record,) = load_records([{"messages": turns, "tools": [WEATHER]}])
    full = tokenize_example(tokenizer, record)
    (last_exchange,) = load_records([{"messages": [turns[0], *turns[5:]], "tools": [WEATHER]}])
    shorter = tokenize_example(tokenizer, last_exchange)
    fitted = tokenize_example(tokenizer, record, max_length=len(shorter["input_ids"]) + 8, overflow="truncate_prompt")
    assert len(full["input_ids"]) > len(fitted["input_ids"]) and fitted == shorter  # system turn kept, the call's exchange gone
    assert tokenize_example(tokenizer, record, max_length=len(shorter["input_ids"]) + 8) is None  # "drop" drops it


@pytest.mark.parametrize("model_path", ["tiny", *INSTRUCT_REPLICAS])
def test_batched_tokenising_gives_the_per_record_labels(model_path, tmp_path):
    from qwen_helpers.data.loading import load_dataset_for_training

    tokenizer = load_tokenizer(model_path)
    records = load_records(DATA / "tools.json")
    plain = load_records(DATA / "multiturn.json")[:3]
    batched = tokenize_records(tokenizer, [*records, *plain], max_length=2048).dataset
    expected = [tokenize_example(tokenizer, record) for record in [*records, *plain]]
    assert batched["input_ids"] == [example["input_ids"] for example in expected]
    assert batched["labels"] == [example["labels"] for example in expected]
    from_file = load_dataset_for_training(tokenizer, DATA / "tools.json", max_length=2048, cache_dir=str(tmp_path), echo=lambda _: None)
    assert from_file.dataset["labels"] == [example["labels"] for example in expected[: len(records)]]


# ------------------------------------------------------------------------------------------ parsing and the metric


def test_parse_tool_calls_returns_calls_and_keeps_malformed_blocks_as_text():
    text, calls = parse_tool_calls("Sure.\n" + CALL_TEXT + "\n<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>")
    assert text == "Sure." and calls == [{"name": "get_weather", "arguments": {"city": "北京"}}, {"name": "f", "arguments": {"x": 1}}]
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])  # kept as the model wrote it, no crash
    assert parse_tool_calls("<tool_call>\n{\"arguments\": {}}\n</tool_call>")[1] == []  # no name: not a call
    assert parse_tool_calls("no call here") == ("no call here", [])


def test_tool_call_exact_match_compares_names_and_parsed_arguments():
    records = load_records([{"messages": CONVERSATION[:3], "tools": [WEATHER]}, {"messages": CONVERSATION[1:2] + [CONVERSATION[4]]}])
    right = [{"name": "get_weather", "arguments": {"city": "北京"}}]
    assert tool_call_exact_match(records, [right, []]) == 100.0
    assert tool_call_exact_match(records, [[{"name": "get_weather", "arguments": {"city": "上海"}}], []]) == 50.0
    assert tool_call_exact_match(records, [right, right]) == 50.0  # a call where the answer is text is a miss
    assert tool_call_exact_match(records, [[{"name": "get_time", "arguments": {"city": "北京"}}], []]) == 50.0
    rows = scores_by_task(records, ["", "北京现在3°C。"], [right, []])
    assert [row["tool_call_match"] for row in rows] == [100.0, 100.0]
    assert "tool_call_match" not in scores_by_task(records[1:], ["x"], [[]])[0]  # no tool calls in the test set: no column


def test_an_answer_that_calls_the_wrong_tool_is_no_exact_match():
    """A call-only answer's text is empty on both sides: its exact match must come from the calls."""
    records = load_records([{"messages": CONVERSATION[:3], "tools": [WEATHER]}, {"messages": CONVERSATION[1:2] + [CONVERSATION[4]]}])
    wrong_city = [{"name": "get_weather", "arguments": {"city": "上海"}}]
    (row,) = [row for row in scores_by_task(records, ["", "北京现在3°C。"], [wrong_city, []]) if row["task"] == "all"]
    assert row["exact_match"] == 50.0 and row["tool_call_match"] == 50.0  # was 100 exact beside 50 calls
    right = [{"name": "get_weather", "arguments": {"city": "北京"}}]
    assert [row["exact_match"] for row in scores_by_task(records, ["", "北京现在3°C。"], [right, []])] == [100.0, 100.0]


# ------------------------------------------------------------------------------------------ end to end


def test_held_out_tool_calls_are_scored_during_training_and_can_pick_the_best(tmp_path, capsys):
    from qwen_helpers import train_lora

    data = tmp_path / "tools.json"
    data.write_text(json.dumps(json.loads((DATA / "tools.json").read_text(encoding="utf-8"))[:4], ensure_ascii=False), encoding="utf-8")
    output = tmp_path / "scored"
    assert train_lora.main(["--data_path", str(data), "--eval_data_path", str(data), "--output_dir", str(output),
                            "--eval_strategy", "steps", "--eval_steps", "1", "--eval_generate_records", "4", "--eval_max_new_tokens", "8",
                            "--metric_for_best_model", "tool_call_match", "--max_steps", "2", "--per_device_train_batch_size", "2",
                            "--save_strategy", "no", "--disable_tqdm", "True", "--report_to", "none"]) == 0
    evaluations = [record for record in json.loads((output / "loss_history.json").read_text()) if "eval_loss" in record]
    assert len(evaluations) == 2 and all(0 <= record["eval_tool_call_match"] <= 100 for record in evaluations)
    # every one of these answers is a call: exact match needs the calls too, so it cannot exceed the calls' share
    assert all(record["eval_exact_match"] <= record["eval_tool_call_match"] for record in evaluations)
    refused = train_lora.main(["--data_path", "data/train.json", "--eval_data_path", "data/test.json", "--output_dir", str(tmp_path / "x"),
                               "--eval_strategy", "steps", "--metric_for_best_model", "tool_call_match"])
    assert refused == 2 and "no answer in --eval_data_path data/test.json calls a tool" in capsys.readouterr().err



def test_memorised_an_adapter_trained_on_tool_calls_makes_a_trained_call_that_inference_parses(tmp_path):
    """Memorised, not learned: on the random tiny model an adapter trained on the first records of data/tools.json
    reproduces a call it was trained on, and inference returns it parsed. (All 14 records need far more steps on
    the tiny model: its loss stays near 3 after 60.) A real Qwen is needed to call tools for unseen questions."""
    from qwen_helpers import inference, train_lora

    data, adapter, predictions = tmp_path / "tools.json", tmp_path / "tools-lora", tmp_path / "preds.jsonl"
    data.write_text(json.dumps(json.loads((DATA / "tools.json").read_text(encoding="utf-8"))[:2], ensure_ascii=False), encoding="utf-8")
    assert train_lora.main(["--data_path", str(data), "--output_dir", str(adapter), *MEMORISE]) == 0
    assert inference.main(["--adapter_path", str(adapter), "--data_path", str(data), "--output_file", str(predictions),
                           "--max_new_tokens", "30"]) == 0
    lines = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2 and all(line["reference_tool_calls"] and "tool_calls" in line for line in lines)
    reproduced = [line for line in lines if line["tool_calls"] == line["reference_tool_calls"]]
    assert reproduced, [(line["prediction"], line["tool_calls"]) for line in lines]
    assert reproduced[0]["prediction"] == ""  # the parsed block is taken out of the text


# the notebooks' recipe for memorising on the tiny model: a high learning rate, every linear layer adapted
MEMORISE = ["--max_steps", "24", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--lora_r", "16", "--lora_alpha", "32",
            "--lora_dropout", "0", "--target_modules", "all-linear", "--save_strategy", "no", "--report_to", "none", "--max_length", "512",
            "--disable_tqdm", "True"]
