"""Raw-text continued pre-training (--data_format text): no chat template, every token trained, documents packed into blocks.

The expected token stream is built here independently (each document tokenised on its own, then <|endoftext|>),
and the packed blocks must be exactly its first floor(total / max_length) x max_length tokens, cut in order.
"""

import dataclasses
import json

import pytest
import torch

from conftest import DATA
from qwen_helpers import cli, inspect_data, train_dpo, train_grpo, train_lora, train_prompt_tuning, train_qlora
from qwen_helpers.run import flag_checks
from qwen_helpers.data import raw_text
from qwen_helpers.run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments
from qwen_helpers.common.errors import FlagError
from qwen_helpers.models import loading as modeling
from qwen_helpers.training import sft as train_module
from qwen_helpers.run.prompt_settings import settings_from_run_config
from qwen_helpers.training.batching import TokenBudgetBatchSampler, make_training_collator
from qwen_helpers.data.loading import load_dataset_for_training
from qwen_helpers.data.raw_text import is_raw_text, iter_documents
from qwen_helpers.data.records import DataValidationError, FieldMap, load_records

ENDOFTEXT = 151643  # Qwen's <|endoftext|>: the end of each document (the tiny model's eos is <|im_end|>, 151645)
DOCUMENTS = [
    "Tea is made from the leaves of Camellia sinensis.\nGreen and black teas come from the same plant.",
    "绿茶是不发酵茶，茶汤颜色清绿，滋味鲜爽。",
    "Water temperature matters: 80 degrees for green tea, just off the boil for black tea.",
    "普洱茶产于云南，可以分为生普和熟普。",
] * 3


def write_txt(path, documents=DOCUMENTS, newline="\n"):
    path.write_text(newline.join(["", *(document.replace("\n", newline) + newline for document in documents), ""]),
                    encoding="utf-8", newline="")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def expected_stream(tokenizer, documents=DOCUMENTS) -> list[int]:
    stream = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [ENDOFTEXT]
    return stream


def packed(tokenizer, path, block_length, tmp_path, **options):
    return load_dataset_for_training(tokenizer, path, block_length, cache_dir=str(tmp_path / "cache"), echo=lambda line: None,
                                     **options)


# ---------------------------------------------------------------------------------------------- reading and packing


def test_a_txt_file_is_documents_separated_by_blank_lines(tmp_path):
    assert list(iter_documents(write_txt(tmp_path / "unix.txt"))) == DOCUMENTS  # line breaks inside a document are kept
    assert list(iter_documents(write_txt(tmp_path / "windows.txt", newline="\r\n"))) == DOCUMENTS
    (tmp_path / "one.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "one.txt")) == ["line one\nline two"]  # no blank line: one document


@pytest.mark.parametrize("block_length", [16, 37])
def test_documents_pack_into_blocks_of_exactly_max_length_with_every_token_trained(tmp_path, tokenizer, block_length):
    stream = expected_stream(tokenizer)
    data = packed(tokenizer, write_txt(tmp_path / "corpus.txt"), block_length, tmp_path)
    rows = data.dataset
    assert len(rows) == len(stream) // block_length == data.kept > 1  # the last partial block is dropped
    assert all(len(ids) == block_length for ids in rows["input_ids"])
    assert rows["labels"] == rows["input_ids"]  # every token trained: no -100 anywhere
    assert all(set(mask) == {1} for mask in rows["attention_mask"])
    assert [token for ids in rows["input_ids"] for token in ids] == stream[: len(rows) * block_length]
    # <|endoftext|> after each document (not the tokenizer's eos, <|im_end|>), never a chat template's tokens
    assert [token for ids in rows["input_ids"] for token in ids].count(ENDOFTEXT) == stream[: len(rows) * block_length].count(ENDOFTEXT) > 1
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in {token for ids in rows["input_ids"] for token in ids}
    left = len(stream) - len(rows) * block_length
    assert f"{len(rows)} blocks of {block_length} tokens packed from {len(DOCUMENTS)} documents" in data.summary()
    assert f"the last {left} tokens" in data.summary()


def test_packing_is_exact_across_batches_and_jsonl_records_pack_as_the_txt_does(tmp_path, tokenizer, monkeypatch):
    """Small tokenising and packing batches (2 documents, 1 block) give the same blocks: no remainder is lost between batches."""
    reference = packed(tokenizer, write_txt(tmp_path / "corpus.txt"), 16, tmp_path / "a").dataset["input_ids"]
    monkeypatch.setattr(raw_text, "BATCH_SIZE", 2)
    monkeypatch.setattr(raw_text, "BLOCKS_PER_BATCH", 1)
    assert packed(tokenizer, tmp_path / "corpus.txt", 16, tmp_path / "b").dataset["input_ids"] == reference
    records = [{"text": document, "meta": {"source": "test"}} for document in DOCUMENTS]  # extra fields are ignored
    jsonl = packed(tokenizer, write_jsonl(tmp_path / "corpus.jsonl", records), 16, tmp_path / "c").dataset
    assert jsonl["input_ids"] == reference and jsonl["labels"] == reference


def test_auto_detects_txt_files_and_text_records(tmp_path):
    txt = write_txt(tmp_path / "corpus.txt")
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a document"}])
    array = tmp_path / "corpus.json"
    array.write_text(json.dumps([{"text": "a document", "id": 1}]), encoding="utf-8")
    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "text": "the answer"}])
    assert is_raw_text(txt) and is_raw_text(jsonl) and is_raw_text(array)
    assert not is_raw_text(DATA / "train.json") and not is_raw_text(DATA / "multiturn.json")
    assert not is_raw_text(renamed, fields=FieldMap(instruction="question", output="text"))  # 'text' is a mapped answer field
    assert not is_raw_text(txt, "alpaca") and is_raw_text(DATA / "train.json", "text")  # a forced format wins


@pytest.mark.parametrize("replica", ["tiny-qwen2.5-base", "tiny-qwen2.5-instruct", "tiny-qwen3", "tiny-qwen1.5-chat"])
def test_documents_end_with_endoftext_on_base_and_instruct_checkpoints(replica):
    """The released files differ in eos (<|endoftext|> on base, <|im_end|> on instruct); a document ends the same on both."""
    from qwen_helpers.models.loading import load_tokenizer
    from qwen_helpers.common.tiny import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(replica))
    assert raw_text.document_end_id(tokenizer) == ENDOFTEXT == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_chat_readers_refuse_raw_text_in_one_line(tmp_path):
    for path in (write_txt(tmp_path / "corpus.txt"), write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a document"}])):
        with pytest.raises(DataValidationError, match=r"raw text .* trains with --data_format text on train_lora"):
            load_records(path)


# ---------------------------------------------------------------------------------------------- batching


def test_the_kits_collators_and_token_budget_batch_blocks_unchanged(tmp_path, tokenizer):
    rows = packed(tokenizer, write_txt(tmp_path / "corpus.txt"), 16, tmp_path).dataset
    examples = [rows[index] for index in range(3)]
    padded = make_training_collator(tokenizer, padding_free=False)(examples)
    assert padded["input_ids"].shape == (3, 16) and torch.equal(padded["labels"], padded["input_ids"])
    flat = make_training_collator(tokenizer, padding_free=True)(examples)  # one row, positions restarting per block
    assert flat["input_ids"].shape == (1, 48) and flat["position_ids"][0].tolist() == list(range(16)) * 3
    labels, ids = flat["labels"][0], flat["input_ids"][0]
    # each block's first label is -100: a position no token predicts (the first of a row is never a target), so
    # the loss covers the same tokens as the padded batch; every other label is its input id
    assert labels[::16].tolist() == [-100] * 3 and torch.equal(labels.view(3, 16)[:, 1:], ids.view(3, 16)[:, 1:])
    sampler = TokenBudgetBatchSampler([len(ids) for ids in rows["input_ids"][:5]], token_budget=32, padding_free=True)
    assert sorted(len(batch) for batch in sampler) == [1, 2, 2]  # equal blocks: two per 32-token budget


# ---------------------------------------------------------------------------------------------- the training command


def test_train_lora_trains_raw_text_blocks_with_every_label_its_input_id(tmp_path, monkeypatch, capsys):
    seen = []
    original = train_module.KitTrainer.training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        seen.append({name: inputs[name].clone() for name in ("input_ids", "labels")})
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(train_module.KitTrainer, "training_step", recording_step)
    train_file = write_txt(tmp_path / "corpus.txt")
    held_out = write_txt(tmp_path / "held_out.txt", DOCUMENTS[:4])
    output = tmp_path / "run"
    code = train_lora.main(["--data_path", str(train_file), "--eval_data_path", str(held_out), "--max_length", "32",
                            "--padding_free", "False", "--per_device_train_batch_size", "2", "--max_steps", "2",
                            "--eval_strategy", "steps", "--eval_steps", "2", "--output_dir", str(output),
                            "--disable_tqdm", "True", "--report_to", "none"])  # --data_format auto detects the .txt
    printed = capsys.readouterr().out
    assert code == 0
    assert len(seen) == 2 and all(batch["input_ids"].shape == (2, 32) for batch in seen)
    assert all(torch.equal(batch["labels"], batch["input_ids"]) for batch in seen)  # every token trained
    assert "blocks of 32 tokens packed from 12 documents" in printed
    run = json.loads((output / "run_config.json").read_text(encoding="utf-8"))
    assert run["data_format"] == "text" and run["training_system_prompt"] is None
    history = json.loads((output / "loss_history.json").read_text(encoding="utf-8"))
    evaluations = [record for record in history if "eval_loss" in record]
    assert evaluations and all(torch.isfinite(torch.tensor(record["eval_loss"])) for record in evaluations)
    assert not any("eval_chrf" in record for record in history)  # raw text has no answers to generate and score


def test_padding_free_raw_text_trains_every_token_but_each_blocks_first(tmp_path, monkeypatch, capsys):
    """Padding-free (one row per batch): the loss is the padded blocks' loss, over every token but each block's first.

    The reference is the same model on the same blocks as a padded batch (standard labels = input ids), at each
    step before its update; it matches only if no block attends to another and the same tokens are counted.
    On a base checkpoint (eos <|endoftext|>) raw text trains no chat-token rows: it has no chat turns.
    """
    block, seen = 32, []
    original = train_module.KitTrainer.compute_loss

    def recording_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        blocks = inputs["input_ids"].view(-1, block)
        with torch.no_grad():
            reference = model(input_ids=blocks, labels=blocks).loss  # mean over every token but each row's first
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        seen.append(dict(inputs={name: inputs[name].clone() for name in ("input_ids", "labels", "position_ids")},
                         items=int(num_items_in_batch), loss=loss.item(), reference=reference.item()))
        return loss

    monkeypatch.setattr(train_module.KitTrainer, "compute_loss", recording_loss)
    output = tmp_path / "run"
    code = train_lora.main(["--model_path", "tiny-qwen2.5-base", "--data_path", str(write_txt(tmp_path / "corpus.txt")),
                            "--max_length", str(block), "--padding_free", "True", "--per_device_train_batch_size", "2",
                            "--lora_dropout", "0", "--max_steps", "2", "--output_dir", str(output), "--disable_tqdm", "True",
                            "--report_to", "none"])
    printed = capsys.readouterr().out
    assert code == 0 and len(seen) == 2 and "batches: padding-free" in printed
    for step in seen:
        ids, labels, positions = (step["inputs"][name][0] for name in ("input_ids", "labels", "position_ids"))
        assert ids.shape == (2 * block,) and positions.tolist() == list(range(block)) * 2  # one row, two whole blocks
        assert labels[::block].tolist() == [-100, -100]  # each block's first token: no position predicts it
        assert torch.equal(labels.view(2, block)[:, 1:], ids.view(2, block)[:, 1:])  # every other token trained
        assert step["items"] == 2 * (block - 1)
        assert step["loss"] == pytest.approx(step["reference"], rel=1e-4)
    assert "also training the embedding rows" not in printed
    assert not json.loads((output / "adapter_config.json").read_text(encoding="utf-8")).get("trainable_token_indices")


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", '{"text": "a document"}\n{"text": "   "}\n', "empty.jsonl, record 1, field 'text': the text is empty"),
    ("number.jsonl", '{"text": 42}\n', "number.jsonl, record 0, field 'text': expected a string, found int"),
    ("blank.txt", "\n\n   \n\n", "blank.txt: no text found"),
    ("short.txt", "Too short.\n", "fewer than one block of --max_length 512"),
    ("alpaca.json", '[{"instruction": "hi", "output": "hello"}]', "alpaca.json, record 0: missing field 'text'"),
])
def test_bad_raw_text_is_one_line_and_exit_2_before_the_model_loads(tmp_path, monkeypatch, capsys, name, content, expected):
    monkeypatch.setattr(train_module, "load_model_for_training", lambda *a, **k: pytest.fail("the model loaded before the data was checked"))
    (tmp_path / name).write_text(content, encoding="utf-8")
    code = train_lora.main(["--data_path", str(tmp_path / name), "--data_format", "text", "--output_dir", str(tmp_path / "run"),
                            "--max_steps", "1", "--disable_tqdm", "True"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, flags, expected", [
    (train_lora, ["--eval_data_path", str(DATA / "test.json")], "holds instruction or chat records, while --data_path"),
    (train_lora, ["--eval_data_path", "{txt}", "--metric_for_best_model", "chrf", "--eval_strategy", "steps"],
     "--metric_for_best_model chrf: raw text has no answers to score"),
    (train_prompt_tuning, ["--task", "classification"], "raw text has no answers to classify"),
    (train_dpo, ["--data_format", "text"], "--data_format: train_dpo reads preference pairs"),
    (train_grpo, ["--data_format=text"], "--data_format: train_grpo reads prompt records"),
])
def test_what_raw_text_cannot_do_is_refused_in_one_line(tmp_path, monkeypatch, capsys, command, flags, expected):
    monkeypatch.setattr(modeling, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded before the flags were checked"))
    txt = write_txt(tmp_path / "corpus.txt")
    flags = [str(txt) if flag == "{txt}" else flag for flag in flags]
    code = command.main(["--data_path", str(txt), "--output_dir", str(tmp_path / "run"), "--max_steps", "1", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors


@pytest.mark.parametrize("command, flags, expected", [
    (train_lora, ["--overflow", "truncate_prompt"], "--overflow truncate_prompt: raw text has no chat turns to truncate"),
    (train_lora, ["--enable_thinking", "True"], "--enable_thinking True: raw text has no chat template, so no thinking block"),
    (train_lora, ["--instruction_field", "prompt"], "--instruction_field prompt: raw text is read from the 'text' key"),
    (train_lora, ["--system_field", "persona"], "--system_field persona: raw text is read from the 'text' key"),
    (train_lora, ["--train_chat_tokens", "True"], "--train_chat_tokens True: raw text has no chat turns"),
    (train_lora, ["--max_eval_records", "50"], "--max_eval_records 50: raw text has no answers to evaluate"),
    (train_lora, ["--eval_generate_records", "4"], "--eval_generate_records 4: raw text has no answers to generate"),
    (train_qlora, ["--data_format", "text", "--overflow", "truncate_prompt"], "--overflow truncate_prompt:"),
    (train_prompt_tuning, ["--enable_thinking", "True"], "--enable_thinking True:"),
    (train_prompt_tuning, ["--task", "generation"], "--task generation / --labels None: raw text has no answers"),
])
def test_a_chat_only_flag_set_for_raw_text_is_refused_not_ignored(tmp_path, monkeypatch, capsys, command, flags, expected):
    """A .txt (auto-detected) or --data_format text: a chat-only flag given a value that would change anything is one line, exit 2."""
    monkeypatch.setattr(modeling, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded before the flags were checked"))
    code = command.main(["--data_path", str(write_txt(tmp_path / "corpus.txt")), "--output_dir", str(tmp_path / "run"),
                         "--max_steps", "1", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert "drop the flag" in errors[0] or "drop them" in errors[0]
    assert not (tmp_path / "run").exists()


def test_chat_only_flags_at_values_that_change_nothing_are_accepted_for_raw_text(tmp_path):
    """The defaults given explicitly, and the 'off' values (0 records, no chat-token rows), pass the quick parse's checks."""
    harmless = ["--overflow", "drop", "--enable_thinking", "False", "--instruction_field", "instruction", "--output_field", "output",
                "--train_chat_tokens", "False", "--max_eval_records", "0", "--eval_generate_records", "0", "--eval_max_new_tokens", "64"]
    argv = ["--data_path", str(write_txt(tmp_path / "corpus.txt")), "--output_dir", str(tmp_path / "run"), *harmless]
    model_args, data_args, lora_args, training_args = cli.parse_training_args("lora", argv)
    assert data_args.overflow == "drop" and lora_args.train_chat_tokens is False and data_args.max_eval_records == 0
    # the same flags on chat records are untouched by the raw-text check
    assert flag_checks.check_raw_text_flags(dataclasses.replace(data_args, data_path=str(DATA / "train.json"), overflow="truncate_prompt",
                                                                enable_thinking=True)) is False


def test_the_refused_values_start_from_the_dataclasses_defaults():
    """RAW_TEXT_IGNORES names each flag's default first; a changed default in config.py must be changed there too."""
    defaults = {field.name: field.default for config in (DataArguments, LoraArguments, KitTrainingArguments)
                for field in dataclasses.fields(config) if field.init}
    assert {name: allowed[0] for name, (allowed, _) in flag_checks.RAW_TEXT_IGNORES.items()} == {
        name: defaults[name] for name in flag_checks.RAW_TEXT_IGNORES}


def test_train_refuses_a_chat_only_flag_for_raw_text_in_python_too(tmp_path, monkeypatch):
    """The notebooks call train() with dataclasses, past the command line's quick parse: the same check runs there."""
    monkeypatch.setattr(modeling, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded before the flags were checked"))
    data = DataArguments(data_path=str(write_txt(tmp_path / "corpus.txt")), data_format="text", enable_thinking=True)
    training = KitTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none")
    with pytest.raises(FlagError, match=r"^--enable_thinking True: raw text has no chat template"):
        train_module.train(ModelArguments(), data, training, lora_args=LoraArguments())


def test_a_raw_text_adapter_reads_chat_files_afterwards():
    """Inference and export take the data format from run_config.json: after raw text, their test files are chat records."""
    settings = settings_from_run_config({"data_format": "text", "training_system_prompt": None})
    assert settings.data_format == "auto" and settings.system_prompt is None
    assert settings_from_run_config({"data_format": "sharegpt", "training_system_prompt": None}).data_format == "sharegpt"


# ---------------------------------------------------------------------------------------------- inspect_data


def test_inspect_data_shows_the_packed_blocks_holding_a_document_every_token_trained(tmp_path, tokenizer, capsys):
    path = write_txt(tmp_path / "corpus.txt")
    assert inspect_data.main(["--data_path", str(path), "--index", "5", "--max_length", "16", "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["labels"] == view["input_ids"] and view["trained_tokens"] == view["tokens"] == 16 * len(view["blocks"])
    assert all(len(block["input_ids"]) == 16 for block in view["blocks"])
    start, end = view["document_span"]
    assert tokenizer.decode(view["input_ids"][start:end]) == DOCUMENTS[5] + "<|endoftext|>"
    training_rows = packed(tokenizer, path, 16, tmp_path).dataset["input_ids"]  # the same blocks training packs
    first = view["first_block"]
    assert [block["input_ids"] for block in view["blocks"]] == training_rows[first:first + len(view["blocks"])]
    assert inspect_data.main(["--data_path", str(path), "--index", "12"]) == 2
    error = capsys.readouterr().err
    assert "error: --index 12: " in error and "has 12 documents (0 to 11)" in error


@pytest.mark.parametrize("flags, expected", [(["--enable_thinking", "True"], "--enable_thinking True: raw text has no chat template"),
                                             (["--output_field", "answer"], "--output_field answer: raw text is read from the 'text' key")])
def test_inspect_data_refuses_a_chat_only_flag_on_raw_text(tmp_path, monkeypatch, capsys, flags, expected):
    monkeypatch.setattr(inspect_data, "check_model_path", lambda *a, **k: pytest.fail("the model was looked up before the flags were checked"))
    assert inspect_data.main(["--data_path", str(write_txt(tmp_path / "corpus.txt")), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors


def test_every_documents_view_is_the_blocks_training_packs(tmp_path, tokenizer):
    """Each document's blocks, found by streaming the file, are those training packs; a tail in the dropped remainder is counted."""
    path = write_txt(tmp_path / "corpus.txt")
    rows = packed(tokenizer, path, 16, tmp_path).dataset["input_ids"]
    stream, offset = expected_stream(tokenizer), 0
    for index, document in enumerate(DOCUMENTS):
        view = inspect_data.inspect_text(tokenizer, path, index, 16)
        length = len(tokenizer(document, add_special_tokens=False)["input_ids"]) + 1
        first, start = divmod(offset, 16)
        assert view["first_block"] == first and view["document_span"] == [start, start + length]
        assert [block["input_ids"] for block in view["blocks"]] == rows[first:first + len(view["blocks"])]
        assert view["dropped_tokens"] == max(0, offset + length - len(rows) * 16)
        offset += length
    assert offset == len(stream) and view["dropped_tokens"] > 0  # the last document's tail is the dropped remainder
