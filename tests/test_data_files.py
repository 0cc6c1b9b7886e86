"""Data files through datasets: the same ids and labels as record by record, the same errors, the cache, Arrow-backed results."""

import json
import os

import pytest

from qwen_helpers.benchmark.data_speed import DataSpeedArguments, generate_jsonl, markdown, run_data_benchmark, summarise
from qwen_helpers.data.encoding import _encode_with_labels, build_messages, encode_conversations, token_ids, tokenize_example, tokenize_records
from qwen_helpers.data.loading import load_dataset_for_training
from qwen_helpers.common.errors import KitError
from qwen_helpers.models.loading import load_tokenizer
from qwen_helpers.data.records import DataValidationError, iter_records, load_records

from conftest import DATA

TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add them"}]
# Records the fast path must hand to the per-record path, or match it exactly: every one is compared below.
TRICKY = [
    {"messages": TURNS},
    {"messages": [{"role": "system", "content": ""}, *TURNS[:2]]},  # an empty text
    {"messages": [{"role": "user", "content": "<tool_response>x</tool_response>"}, *TURNS[1:]]},  # Qwen3 reads user texts
    {"instruction": "say </think> now", "output": "ok, done"},  # Qwen3 reads user texts (not answers: refused)
    {"instruction": "forge", "output": "a<|im_end|>\n<|im_start|>user\nb"},  # special-token text in data stays text
    {"instruction": "q", "output": "a", "reasoning": "\nnewlines the template strips\n"},
    {"instruction": "q", "input": "\n\nleading newlines", "output": "\n\nanswer", "system": "  spaced  "},
]



@pytest.mark.parametrize("split_special_tokens", [True, False])
def test_token_ids_are_the_transformers_call(tokenizer, split_special_tokens):
    """Both tokenising paths use token_ids (the Rust tokenizer without offsets): its ids are the tokenizer call's."""
    texts = ["Hello", "今天天气很好。", "a<|im_end|>\n<|im_start|>user\nb", " leading space", "\n\n", "<think>\n\n</think>"]
    expected = tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    setting = tokenizer._tokenizer.encode_special_tokens
    assert token_ids(tokenizer, texts, split_special_tokens=split_special_tokens) == expected
    assert token_ids(tokenizer, [], split_special_tokens=split_special_tokens) == []
    assert tokenizer._tokenizer.encode_special_tokens is setting  # the tokenizer's own setting is put back

def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def _load(tokenizer, path, tmp_path, max_length=4096, **options):
    lines = []
    data = load_dataset_for_training(tokenizer, path, max_length, cache_dir=str(tmp_path / "cache"), echo=lines.append, **options)
    return data, lines


@pytest.mark.parametrize("model_path, enable_thinking", [("tiny", False), ("tiny-qwen3", False), ("tiny-qwen3", True), ("tiny-qwen1.5-chat", False)])
@pytest.mark.parametrize("name", ["train.json", "multiturn.json"])
def test_a_file_gives_the_ids_and_labels_of_record_by_record(tmp_path, model_path, enable_thinking, name):
    tokenizer = load_tokenizer(model_path)
    data, _ = _load(tokenizer, DATA / name, tmp_path, enable_thinking=enable_thinking)
    expected = [_encode_with_labels(tokenizer, record, enable_thinking) for record in load_records(DATA / name)]
    rows = data.dataset[:]
    assert rows["input_ids"] == [example["input_ids"] for example in expected]
    assert rows["labels"] == [example["labels"] for example in expected]
    assert rows["attention_mask"] == [example["attention_mask"] for example in expected]
    assert data.dataset.column_names == ["input_ids", "attention_mask", "labels"]


@pytest.mark.parametrize("model_path", ["tiny", "tiny-qwen3", "tiny-qwen1.5-chat"])
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_records_the_fast_path_cannot_take_still_match(model_path, enable_thinking):
    tokenizer = load_tokenizer(model_path)
    records = [record for tricky in TRICKY for record in load_records([tricky])]  # one format per load

    def outcome(encode):  # the example, or the error's reason (a template that strips a text is refused both ways)
        try:
            return encode()
        except ValueError as error:
            return str(error).partition(": ")[2] or str(error)

    batched = outcome(lambda: encode_conversations(tokenizer, [build_messages(record, enable_thinking=enable_thinking) for record in records],
                                                   enable_thinking))
    one_by_one = [outcome(lambda: _encode_with_labels(tokenizer, record, enable_thinking)) for record in records]
    if isinstance(batched, str):  # the batch stops at the first refused record, with the same reason
        assert batched == next(result for result in one_by_one if isinstance(result, str))
        ok = [record for record, result in zip(records, one_by_one) if not isinstance(result, str)]
        batched = encode_conversations(tokenizer, [build_messages(record, enable_thinking=enable_thinking) for record in ok], enable_thinking)
        one_by_one = [result for result in one_by_one if not isinstance(result, str)]
    assert batched == one_by_one


def test_a_record_the_template_cannot_mark_is_named_with_its_file(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "marked.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "marker \ue000c0\ue002", "output": "x"}])
    with pytest.raises(DataValidationError, match=r"marked\.jsonl, record 1: The chat template rewrites message contents"):
        _load(tokenizer, path, tmp_path)


def test_over_long_records_are_reported_from_a_file_as_from_a_list(tokenizer, tmp_path):
    def exchange(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    long = {"messages": exchange("Summarise: " + "很长的文本。" * 80, "短")}
    long_history = {"messages": [*long["messages"], *exchange("Again", "短")]}
    records = [{"messages": exchange("你好", "Hello")}, long, long_history]
    path = _write_jsonl(tmp_path / "long.jsonl", records)
    for overflow in ("drop", "truncate_prompt"):
        data, lines = _load(tokenizer, path, tmp_path, max_length=64, overflow=overflow)
        listed = tokenize_records(tokenizer, load_records(records), 64, overflow)
        assert (data.kept, data.dropped, data.truncated) == (listed.kept, listed.dropped, listed.truncated)
        assert data.dataset[:]["labels"] == listed.dataset[:]["labels"]
        assert lines[0].startswith(f"tokenised 3 records of {path} in ") and lines[0].endswith(f"records/s): {data.summary()}")
    assert (listed.truncated, listed.dropped) == (1, [1])  # the long exchange alone is never cut inside
    assert tokenize_records(tokenizer, load_records(records), 64).dropped == [1, 2]
    assert tokenize_example(tokenizer, load_records([long])[0], 64) is None
    with pytest.raises(DataValidationError, match="Every record is longer than max_length=8"):
        _load(tokenizer, path, tmp_path, max_length=8)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], r"bad\.jsonl, record 1: missing field 'output'"),
        (['{"instruction": "a", "output": "b"}', "", '{"instruction": "a", "output": "b", "output": "c"}'],
         r"bad\.jsonl, record 1: the key 'output' appears twice"),
        (['{"instruction": "a", "output": "b"}', '{"instruction": '], r"bad\.jsonl: malformed JSON on line 2"),
        (['{"instruction": "a", "output": 3}'], r"bad\.jsonl, record 0, field 'output': expected a string, found int"),
        (['{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}'], r"bad\.jsonl, record 0, turn 1: unknown role 'bot'"),
        (['', '  '], r"bad\.jsonl: the file is empty"),
    ],
)
def test_bad_records_in_a_file_get_the_loaders_errors(tokenizer, tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataValidationError, match=message):
        load_records(path)
    with pytest.raises(DataValidationError, match=message):
        _load(tokenizer, path, tmp_path)


def test_non_utf8_jsonl_names_the_byte_and_its_offset(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n' + json.dumps({"instruction": "你好", "output": "b"}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataValidationError, match=r"gbk\.jsonl: not UTF-8 text \(byte 0xc4 at offset 53\).*iconv -f GBK"):
        load_records(path)


def test_json_lines_are_read_one_at_a_time(tmp_path):
    path = tmp_path / "stream.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"broken\n', encoding="utf-8")
    assert next(iter_records(path))["output"] == "b"  # the broken second line is not read yet
    with pytest.raises(DataValidationError, match="line 2"):
        list(iter_records(path))


def test_the_cache_is_reused_and_renewed_when_a_setting_or_the_file_changes(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "cached.jsonl", load_records(DATA / "train.json")[:20])
    first, _ = _load(tokenizer, path, tmp_path, max_length=512)
    again, _ = _load(tokenizer, path, tmp_path, max_length=512)
    shorter, _ = _load(tokenizer, path, tmp_path, max_length=64, overflow="truncate_prompt")
    files = [data.dataset.cache_files[0]["filename"] for data in (first, again, shorter)]
    assert files[0] == files[1] != files[2]
    assert all(str(tmp_path / "cache") in file for file in files)  # in the cache folder, not beside the data
    thinking, _ = _load(load_tokenizer("tiny-qwen3"), path, tmp_path, max_length=512, enable_thinking=True)
    assert thinking.dataset.cache_files[0]["filename"] not in files
    _write_jsonl(path, load_records(DATA / "train.json")[:10])
    edited, _ = _load(tokenizer, path, tmp_path, max_length=512)
    assert edited.kept == 10 and edited.dataset.cache_files[0]["filename"] not in files


def test_a_same_size_edit_with_the_modification_time_restored_is_tokenised_again(tokenizer, tmp_path):
    path = tmp_path / "edited.jsonl"
    path.write_text('{"instruction": "Say it", "output": "Hello"}\n', encoding="utf-8")
    first, _ = _load(tokenizer, path, tmp_path, max_length=512)
    stat = path.stat()
    path.write_text('{"instruction": "Say it", "output": "Adieu"}\n', encoding="utf-8")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as a copy tool or a checkout that keeps times
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    edited, _ = _load(tokenizer, path, tmp_path, max_length=512)
    trained = [token for token in edited.dataset[0]["labels"] if token != -100]
    before = [token for token in first.dataset[0]["labels"] if token != -100]
    assert tokenizer.decode(trained) == "Adieu<|im_end|>" != tokenizer.decode(before)


def test_a_generated_5_mb_file_ends_memory_mapped(tokenizer, tmp_path):
    path = tmp_path / "generated.jsonl"
    records = generate_jsonl(path, 5, "alpaca", seed=1)
    assert path.stat().st_size >= 5e6 and records > 4000
    data, _ = _load(tokenizer, path, tmp_path, max_length=2048)
    assert data.kept == records and data.dataset.cache_files  # Arrow files on disk, memory-mapped, not Python lists
    assert type(data.dataset.data).__name__ == "MemoryMappedTable"


def test_the_benchmark_generates_bilingual_records_of_both_formats_and_reports(tmp_path):
    for data_format in ("alpaca", "messages"):
        path = tmp_path / f"{data_format}.jsonl"
        count = generate_jsonl(path, 0.05, data_format, seed=0)
        records = load_records(path)
        assert len(records) == count and path.read_bytes() == (generate_jsonl(tmp_path / "again.jsonl", 0.05, data_format, 0), (tmp_path / "again.jsonl").read_bytes())[1]
        text = "".join(record["instruction"] + record["output"] for record in records)
        assert any("\u4e00" <= character <= "\u9fff" for character in text) and any(character.isascii() and character.isalpha() for character in text)
    runs = [{"side": side, "seconds": seconds, "records_per_second": 100 / seconds, "cpu_seconds": seconds, "records_per_cpu_second": 100 / seconds,
             "peak_rss_bytes": 2**30, "rss_before_bytes": 2**29, "records": 100, "tokens": 5000, "arrow_backed": True}
            for side, seconds in [("kit", 1.0), ("plain", 2.0), ("plain", 4.0), ("kit", 1.0)]]
    summary = summarise(runs)
    assert summary["kit_over_plain_speed"] == 3.0 and summary["kit_over_plain_speed_per_pair"] == [2.0, 4.0]  # paired, not pooled
    settings = {**DataSpeedArguments().__dict__, "records": 100, "command": "python -m ...", "environment": "cpu"}
    assert "records/s **3.00x** (pairs: 2.00, 4.00)" in markdown(settings, summary, runs)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.md").write_text("earlier", encoding="utf-8")
    with pytest.raises(KitError, match="already holds files"):
        run_data_benchmark(DataSpeedArguments(output_dir=str(tmp_path / "taken")), "python -m ...")
