"""Loading, validation, chat formatting, label masks and collation."""

import json
import re

import pytest

from qwen_helpers.data.encoding import IGNORE_INDEX, format_prompt, length_stats, make_collator, tokenize_example, tokenize_records
from qwen_helpers.data.records import DataValidationError, FieldMap, label_set, load_records

RECORD = {"instruction": "翻译为英文", "input": "你好", "output": "Hello"}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_mask_exactly_the_prompt(tokenizer):
    example = tokenize_example(tokenizer, RECORD)
    prompt_ids = tokenizer(format_prompt(tokenizer, RECORD), add_special_tokens=False)["input_ids"]
    ids, labels = example["input_ids"], example["labels"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    trained = labels[len(prompt_ids) :]
    assert trained == ids[len(prompt_ids) :] and IGNORE_INDEX not in trained
    assert tokenizer.decode(trained) == "Hello<|im_end|>"


def test_im_end_is_trained_although_pad_is_another_end_token(tokenizer):
    labels = tokenize_example(tokenizer, RECORD)["labels"]
    assert labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.pad_token_id == 151643 and 151643 not in labels


def test_masking_is_by_position_when_the_answer_repeats_the_prompt(tokenizer):
    record = {"instruction": "Repeat: Hello", "input": "", "output": "Hello"}
    example = tokenize_example(tokenizer, record)
    trained = [token for token in example["labels"] if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello<|im_end|>"  # the prompt's "Hello" stays masked


def test_system_field_is_honoured_and_extra_fields_kept(tokenizer):
    (record,) = load_records([{**RECORD, "system": "Be brief.", "task": "translate"}])
    assert record["task"] == "translate"
    assert format_prompt(tokenizer, record).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_other_schemas_map_by_field_names():
    fields = FieldMap(instruction="question", input="context", output="answer")
    record, with_context = load_records([{"question": "2+2?", "answer": "4"}, {"question": "Sum?", "context": "1, 2", "answer": "3"}], fields)
    assert (record["instruction"], record["input"], record["output"]) == ("2+2?", "", "4")
    assert with_context["input"] == "1, 2"


def test_jsonl_is_read(tmp_path):
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [RECORD, RECORD]))
    assert len(load_records(path)) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"instruction": "a", "output": "b"},', r"bad\.json: malformed JSON at line 1"),
        ('[{"instruction": "a"}]', r"record 0: missing field 'output'"),
        ('[{"instruction": "a", "output": 3}]', r"record 0, field 'output': expected a string, found int"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "  "}]', r"record 1, field 'output': the output is empty"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": ', r"malformed JSON on line 2"),
        ('{"rows": []}', r"record 0: missing field 'instruction'. Found fields \['rows'\]"),
        ('[]', r"no records found"),
        ('["text"]', r"record 0: expected an object, found str"),
    ],
)
def test_bad_files_get_specific_errors(tmp_path, text, message):
    with pytest.raises(DataValidationError, match=message):
        load_records(_write(tmp_path, "bad.json", text))


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(DataValidationError, match="--data_path .*nope.json: no such data file"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(DataValidationError, match="--data_path .* is a folder; pass a data file in it"):
        load_records(tmp_path)


def test_long_records_are_dropped_or_lose_their_oldest_whole_turns_and_are_counted(tokenizer):
    long = {"instruction": "Summarise: " + "很长的文本。" * 80, "input": "", "output": "短"}
    old_turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "很长的文本。" * 40},
                 {"role": "assistant", "content": "很长的回答。" * 10}]
    last = [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    records = [RECORD, long, *load_records([{"messages": old_turns + last}])]
    dropped = tokenize_records(tokenizer, records, max_length=64, overflow="drop")
    assert dropped.kept == 1 and dropped.dropped == [1, 2] and "dropped" in dropped.summary()
    truncated = tokenize_records(tokenizer, records, max_length=64, overflow="truncate_prompt")
    assert (truncated.kept, truncated.truncated, truncated.dropped) == (2, 1, [1])  # never cut inside a turn
    expected = tokenize_example(tokenizer, load_records([{"messages": old_turns[:1] + last}])[0])  # system stays
    row = truncated.dataset[1]
    assert row["input_ids"] == expected["input_ids"] and row["labels"] == expected["labels"]
    start = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nBye"
    assert tokenizer.decode(row["input_ids"]).startswith(start)


def test_collator_pads_to_the_longest_in_the_batch_not_max_length(tokenizer):
    data = tokenize_records(tokenizer, load_records([RECORD, {**RECORD, "input": "今天天气很好，我们去公园散步吧。"}]), max_length=512)
    batch = make_collator(tokenizer)([data.dataset[0], data.dataset[1]])
    longest = max(len(ids) for ids in data.dataset["input_ids"])
    assert batch["input_ids"].shape == (2, longest) < (2, 512)
    short = len(data.dataset[0]["input_ids"])
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()


def test_length_stats_and_label_set(tokenizer):
    records = load_records("data/classify_train.json")
    stats = length_stats(tokenize_records(tokenizer, records, 512).dataset)
    assert stats["examples"] == len(records) and stats["min"] <= stats["median"] <= stats["max"]
    assert 0 < stats["trained_tokens"] < stats["total_tokens"]
    assert label_set(records) == ["中性", "正面", "负面"]
    assert label_set(load_records("data/train.json")) is None


# ------------------------------------------------------------------------------------------ conversation formats


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]


def test_messages_and_sharegpt_records_give_the_same_conversation():
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[turn["role"]], "value": turn["content"]} for turn in CHAT]
    (messages,) = load_records([{"messages": CHAT, "id": 7}])
    (converted,) = load_records([{"conversations": sharegpt}])
    assert messages["messages"] == converted["messages"] == CHAT[:3]
    assert (messages["instruction"], messages["output"], messages["id"]) == ("Bye", "Goodbye", 7)  # last turn is the reference


def test_loaded_conversations_round_trip_through_a_file(tmp_path):
    records = load_records([{"messages": CHAT, "id": 7}, {"messages": CHAT[:2], "id": 8}])
    path = _write(tmp_path, "again.json", json.dumps(records, ensure_ascii=False))
    assert load_records(path) == records


def test_format_is_detected_per_file_and_can_be_forced(tmp_path):
    path = _write(tmp_path, "chat.jsonl", json.dumps({"messages": CHAT}))
    assert load_records(path)[0]["output"] == "Goodbye"
    with pytest.raises(DataValidationError, match=r"record 0: missing field 'instruction'.*--data_format"):
        load_records(path, data_format="alpaca")
    with pytest.raises(DataValidationError, match=r"record 0: expected a non-empty list under 'conversations'"):
        load_records(path, data_format="sharegpt")


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}], r"record 0, turn 1: unknown role 'bot'"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}], r"record 0, turn 1: the assistant turn is empty"),
        ([{"role": "assistant", "content": "Hello"}], r"record 0: turn order assistant cannot be rendered"),
        (CHAT[:3], r"record 0: turn order user -> assistant -> user cannot be rendered"),
        ([CHAT[0], CHAT[0], CHAT[1]], r"record 0: turn order user -> user -> assistant"),
        ([CHAT[0], {"role": "system", "content": "late"}, CHAT[1]], r"record 0: turn order user -> system -> assistant"),
        ([{"role": "user", "content": 3}, CHAT[1]], r"record 0, turn 0: 'content' must be a string, found int"),
    ],
)
def test_bad_conversations_name_the_record_turn_and_problem(tmp_path, turns, message):
    with pytest.raises(DataValidationError, match=r"bad\.json, " + message):
        load_records(_write(tmp_path, "bad.json", json.dumps([{"messages": turns}])))


def test_non_utf8_file_suggests_iconv(tmp_path):
    path = tmp_path / "gbk.json"
    path.write_bytes(json.dumps([RECORD], ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataValidationError, match=r"gbk\.json: not UTF-8 .*iconv -f GBK -t UTF-8"):
        load_records(path)


def test_duplicate_keys_are_an_error_naming_record_and_key(tmp_path):
    text = '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b", "output": "c"}]'
    with pytest.raises(DataValidationError, match=r"record 1: the key 'output' appears twice"):
        load_records(_write(tmp_path, "dup.json", text))
    nested = '{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}'
    with pytest.raises(DataValidationError, match=r"record 0: the key 'content' appears twice"):
        load_records(_write(tmp_path, "dup.jsonl", nested))


def test_a_mapped_optional_field_that_no_record_has_is_an_error():
    with pytest.raises(DataValidationError, match=r"--system_field persona: no record has a field 'persona'. Fields found: \['input', 'instruction', 'output'\]"):
        load_records([RECORD], FieldMap(system="persona"))


def test_think_blocks_are_split_off_answers():
    from qwen_helpers.data.records import split_reasoning

    assert split_reasoning("<think>\nstep 1\n</think>\n\nAnswer") == ("step 1", "Answer")
    assert split_reasoning("Plain answer") == (None, "Plain answer")
    assert split_reasoning("<think>\n\n</think>\n\nA") == ("", "A")


@pytest.mark.parametrize("output, message", [
    ("answer</think> tail", "the answer holds </think> after its start"),  # Qwen3 would train "answer" as reasoning
    ("Answer <think>mid</think> more", "the answer holds <think> after its start"),  # was KeyError: 'c1'
    ("<think>reason</think>", "the answer is empty once its <think>…</think> block is split off"),
])
def test_think_tags_a_template_would_misread_are_refused_naming_the_record(output, message):
    with pytest.raises(DataValidationError, match=re.escape(f"records, record 1, field 'output': {message}")):
        load_records([RECORD, {"instruction": "q", "output": output}])
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": output}]
    with pytest.raises(DataValidationError, match=r"record 0, turn 1: the (answer|assistant turn) (holds|is empty)"):
        load_records([{"messages": turns}])


def test_reasoning_is_trained_inline_where_the_template_has_no_place_for_it():
    from qwen_helpers.data.encoding import renders_reasoning
    from qwen_helpers.models.loading import load_tokenizer

    (record,) = load_records([{"instruction": "2+2?", "output": "<think>\nadd them\n</think>\n\n4"}])
    qwen25, qwen3 = load_tokenizer("tiny-qwen2.5-instruct"), load_tokenizer("tiny-qwen3")
    assert not renders_reasoning(qwen25) and renders_reasoning(qwen3)

    def trained(tokenizer, thinking):
        labels = tokenize_example(tokenizer, record, enable_thinking=thinking)["labels"]
        return tokenizer.decode([token for token in labels if token != IGNORE_INDEX])

    assert trained(qwen25, True) == "<think>\nadd them\n</think>\n\n4<|im_end|>"  # R1-style: kept, not dropped
    assert trained(qwen25, False) == "4<|im_end|>"  # non-thinking mode drops it, on every template
    assert trained(qwen3, True) == "<think>\nadd them\n</think>\n\n4<|im_end|>"  # Qwen3's own template writes it once


def test_an_empty_system_prompt_is_an_empty_system_turn_in_both_formats_and_absent_means_the_default(tokenizer):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    alpaca = {"instruction": "Hi", "output": "Hello"}
    empty_alpaca, absent_alpaca = load_records([{**alpaca, "system": ""}, alpaca])
    (empty_messages,) = load_records([{"messages": [{"role": "system", "content": ""}, *turns]}])
    (absent_messages,) = load_records([{"messages": turns}])
    assert format_prompt(tokenizer, empty_alpaca) == format_prompt(tokenizer, empty_messages)
    assert format_prompt(tokenizer, empty_alpaca).startswith("<|im_start|>system\n<|im_end|>\n")
    absent = format_prompt(tokenizer, absent_alpaca)
    assert absent == format_prompt(tokenizer, absent_messages) != format_prompt(tokenizer, empty_alpaca)
    assert tokenize_example(tokenizer, empty_alpaca) == tokenize_example(tokenizer, empty_messages)


@pytest.mark.parametrize("records, first", [
    ([RECORD, {"messages": CHAT}], "record 1: a record in messages format, while record 0 is in alpaca format"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, RECORD],
     "record 1: a record in alpaca format, while record 0 is in sharegpt format"),
])
def test_a_file_that_mixes_formats_names_the_first_record_of_the_other_format(tmp_path, records, first):
    path = _write(tmp_path, "mixed.jsonl", "\n".join(json.dumps(record) for record in records))
    with pytest.raises(DataValidationError, match=re.escape(f"mixed.jsonl, {first}: the file mixes record formats")):
        load_records(path)
