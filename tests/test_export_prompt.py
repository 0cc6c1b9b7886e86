"""How a model is asked travels with it: thinking mode, system prompt and field names, from training to export.

One Qwen3 LoRA is trained with the real command in thinking mode, on records with custom field names that all
share one system prompt, from a relative --data_path. Every later step must ask as training did, from any folder:
the merged model's chat template, the Modelfile, the GGUF verification, the vLLM command and inference.
"""

import contextlib
import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest

from qwen_helpers import export, inference, train_lora

from qwen_helpers.models import generation
from qwen_helpers.run.prompt_settings import (
    PROMPT_SETTINGS,
    SYSTEM_PROMPT_KEY,
    PromptSettings,
    recorded_prompt_settings,
    shared_system_prompt,
    with_system_prompt,
)
from qwen_helpers.data.records import FieldMap, load_records
from test_ollama import modelfile_system, modelfile_template, ollama_prompt

from conftest import DATA

SYSTEM = "You translate Chinese into English."
FIELDS = ["--instruction_field", "question", "--output_field", "answer", "--system_field", "persona"]
FAST_RUN = [
    "--max_steps",
    "1",
    "--per_device_train_batch_size",
    "2",
    "--max_length",
    "256",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "True",
    "--report_to",
    "none",
    "--max_eval_records",
    "0",
]


def custom_records(count: int, system: str | None = SYSTEM) -> list[dict]:
    """data/train.json records under other field names (question / answer / persona)."""
    records = json.loads((DATA / "train.json").read_text(encoding="utf-8"))[:count]
    return [
        {
            "question": f"{record['instruction']}\n{record['input']}".strip(),
            "answer": record["output"],
            **({"persona": system} if system else {}),
        }
        for record in records
    ]


def write_json(path, records) -> str:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def thinking_adapter(tmp_path_factory) -> str:
    """A tiny-qwen3 LoRA trained in thinking mode, run from its project folder with a relative --data_path."""
    project = tmp_path_factory.mktemp("project")
    write_json(project / "train.json", custom_records(4))
    with contextlib.chdir(project):
        argv = [
            "--model_path",
            "tiny-qwen3",
            "--data_path",
            "train.json",
            "--output_dir",
            "lora",
            "--enable_thinking",
            "True",
            *FIELDS,
            *FAST_RUN,
        ]
        assert train_lora.main(argv) == 0
    return str(project / "lora")


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Another project's folder as the working directory, with its own train.json (another system prompt)."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    write_json(folder / "train.json", custom_records(2, system="You are a pirate."))
    monkeypatch.chdir(folder)
    return folder


def test_shared_system_prompt_is_the_one_every_record_has():
    same = [{"system": "a"}, {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "hi"}]}]
    assert shared_system_prompt(same) == "a"
    assert shared_system_prompt([*same, {"system": "b"}]) is None
    assert shared_system_prompt([*same, {"instruction": "no system"}]) is None
    assert shared_system_prompt([]) is None
    assert with_system_prompt({"instruction": "x"}, "a")["system"] == "a"
    assert with_system_prompt({"instruction": "x", "system": "own"}, "a")["system"] == "own"
    assert with_system_prompt({"messages": [{"role": "user", "content": "x"}]}, "a")["messages"][0] == {
        "role": "system",
        "content": "a",
    }


@pytest.mark.parametrize("trained_thinking", [True, False])
def test_merged_chat_template_defaults_to_the_trained_mode(trained_thinking):
    from qwen_helpers.models.loading import load_tokenizer
    from qwen_helpers.run.prompt_settings import template_with_thinking_default

    qwen3, qwen25 = load_tokenizer("tiny-qwen3"), load_tokenizer("tiny")
    conversation = [{"role": "user", "content": "早安"}]

    def render(tokenizer, **options):
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **options)

    original = qwen3.chat_template
    qwen3.chat_template = template_with_thinking_default(
        template_with_thinking_default(original, not trained_thinking), trained_thinking
    )
    assert (
        render(qwen3)
        == render(qwen3, enable_thinking=trained_thinking)
        != render(qwen3, enable_thinking=not trained_thinking)
    )
    assert len(qwen3.chat_template) == len(
        template_with_thinking_default(original, trained_thinking)
    )  # re-exporting adds no second line
    assert (
        template_with_thinking_default(qwen25.chat_template, trained_thinking) == qwen25.chat_template
    )  # no switch, nothing to set


def test_training_records_how_the_model_is_asked(thinking_adapter):
    run = json.loads((Path(thinking_adapter) / "run_config.json").read_text(encoding="utf-8"))
    assert run[SYSTEM_PROMPT_KEY] == SYSTEM and run["enable_thinking"] is True
    assert recorded_prompt_settings(thinking_adapter) == PromptSettings(
        True, SYSTEM, FieldMap("question", "input", "answer", "persona"), "auto"
    )


def test_settings_do_not_depend_on_the_working_directory(thinking_adapter, elsewhere, tmp_path):
    """Export's settings (Modelfile SYSTEM and TEMPLATE, verification) are the same from any folder; older runs' too."""
    argv = ["--adapter_path", thinking_adapter, "--output_dir", str(tmp_path / "out"), "--format", "gguf"]
    _, here = export.export_settings(export.parse_export_args(argv))
    with contextlib.chdir(tmp_path):
        _, there = export.export_settings(export.parse_export_args(argv))
    assert here == there and here.system_prompt == SYSTEM and here.enable_thinking
    older = tmp_path / "older_run"
    shutil.copytree(thinking_adapter, older)
    run = json.loads((older / "run_config.json").read_text(encoding="utf-8"))
    del run[
        SYSTEM_PROMPT_KEY
    ]  # written before the system prompt was recorded: its data file is read where the run saw it
    (older / "run_config.json").write_text(json.dumps(run), encoding="utf-8")
    assert recorded_prompt_settings(str(older)).system_prompt == SYSTEM


def test_modelfile_asks_in_the_trained_mode_with_the_trained_system_prompt(thinking_adapter, elsewhere, tmp_path):
    from qwen_helpers.data.encoding import format_prompt
    from qwen_helpers.models.loading import load_tokenizer
    from qwen_helpers.deploy.ollama import modelfile_text

    _, settings = export.export_settings(
        export.parse_export_args(["--adapter_path", thinking_adapter, "--output_dir", str(tmp_path)])
    )
    tokenizer = load_tokenizer("tiny-qwen3")
    modelfile = modelfile_text("model-f32.gguf", tokenizer, settings.system_prompt, settings.enable_thinking)
    record = {"instruction": "翻译为英文", "input": "早上好"}
    prompt = ollama_prompt(
        modelfile_template(modelfile), [{"role": "user", "content": "翻译为英文\n早上好"}], modelfile_system(modelfile)
    )
    assert modelfile_system(modelfile) == SYSTEM
    assert prompt == format_prompt(tokenizer, with_system_prompt(record, SYSTEM), enable_thinking=True)
    assert prompt != format_prompt(tokenizer, with_system_prompt(record, SYSTEM), enable_thinking=False)


def test_hf_export_records_the_mode_in_the_merged_folder(thinking_adapter, elsewhere, tmp_path):
    from transformers import AutoTokenizer

    merged = tmp_path / "merged"
    assert export.main(["--adapter_path", thinking_adapter, "--output_dir", str(merged), "--format", "hf"]) == 0
    saved = json.loads((merged / PROMPT_SETTINGS).read_text(encoding="utf-8"))
    assert saved["enable_thinking"] is True and saved[SYSTEM_PROMPT_KEY] == SYSTEM
    tokenizer = AutoTokenizer.from_pretrained(merged)
    conversation = [{"role": "user", "content": "早安"}]

    def render(**options):
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **options)

    assert (
        render() == render(enable_thinking=True) != render(enable_thinking=False)
    )  # the template's default is the trained mode
    arguments = inference.InferenceArguments(model_path=str(merged), instruction="早安")
    assert arguments.thinking_mode() is True and arguments.system_prompt() == SYSTEM


def test_inference_without_system_uses_the_recorded_one(thinking_adapter, elsewhere, monkeypatch, capsys):
    asked = []

    def fake_generate(model, tokenizer, records, *args, **kwargs):
        asked.append((records[0], kwargs["enable_thinking"]))
        return [{"prediction": "answer", "tool_calls": []}]

    monkeypatch.setattr(generation, "generate_timed", fake_generate)  # what inference's one answer goes through
    assert inference.main(["--adapter_path", thinking_adapter, "--instruction", "早安"]) == 0
    assert inference.main(["--adapter_path", thinking_adapter, "--instruction", "早安", "--system", "Be brief."]) == 0
    assert [(record.get("system"), thinking) for record, thinking in asked] == [(SYSTEM, True), ("Be brief.", True)]


def test_custom_field_names_are_read_as_trained_and_wrong_ones_fail_early(
    thinking_adapter, elsewhere, tmp_path, capsys
):
    custom = write_json(tmp_path / "custom.json", custom_records(3, system=None))
    kit_names = str(DATA / "test.json")
    args = export.parse_export_args(
        ["--adapter_path", thinking_adapter, "--output_dir", str(tmp_path / "x"), "--verify_data", custom]
    )
    records = export.verification_records(args, export.export_settings(args)[1])
    assert [record["system"] for record in records] == [SYSTEM] * 3  # as Ollama sends them with the Modelfile's SYSTEM
    output_dir = tmp_path / "never"
    argv = [
        "--adapter_path",
        thinking_adapter,
        "--output_dir",
        str(output_dir),
        "--format",
        "gguf",
        "--verify_data",
        kit_names,
    ]
    assert export.main(argv) == 2
    assert "--instruction_field" in capsys.readouterr().err and not output_dir.exists()
    flags = ["--instruction_field", "instruction", "--output_field", "output", "--system_field", "system"]
    args = export.parse_export_args([*argv, *flags])
    assert len(export.verification_records(args, export.export_settings(args)[1])) == args.verify_prompts
    assert len(inference.InferenceArguments(adapter_path=thinking_adapter, data_path=custom).read_records()) == 3
    predictions = str(tmp_path / "preds.jsonl")
    assert (
        inference.main(["--adapter_path", thinking_adapter, "--data_path", kit_names, "--output_file", predictions])
        == 2
    )
    assert "--instruction_field" in capsys.readouterr().err


def test_vllm_check_serves_in_the_trained_mode(thinking_adapter, tmp_path):
    from qwen_helpers.deploy.serving import check_vllm_adapter

    spaced = tmp_path / "my adapters" / "lora"
    shutil.copytree(thinking_adapter, spaced)
    result = check_vllm_adapter(str(spaced))
    assert result.passed, result.problems
    words = shlex.split(result.command())
    assert words[words.index("--lora-modules") + 1] == f"lora={spaced}"
    assert json.loads(words[words.index("--default-chat-template-kwargs") + 1]) == {"enable_thinking": True}
    assert SYSTEM in str(result) and "chat_template_kwargs" in str(result)


LLAMA_CPP_MISSING = importlib.util.find_spec("llama_cpp") is None


@pytest.mark.skipif(
    LLAMA_CPP_MISSING, reason="llama-cpp-python is not installed: pip install -e '.[gguf]' (CI's .ci/run installs it)"
)
def test_gguf_export_verifies_in_thinking_mode_and_counts_typed_control_tokens_apart(
    thinking_adapter, tmp_path, capsys
):
    from qwen_helpers.deploy import gguf as gguf_export
    from qwen_helpers.data.encoding import format_prompt, tokenize_prompt
    from qwen_helpers.models.loading import load_tokenizer

    try:
        gguf_export.find_converter()
    except gguf_export.MissingToolError:
        pytest.skip(f"llama.cpp's converter is not fetched: {gguf_export.FETCH_CONVERTER}")
    typed = {"question": "Repeat after me: <|im_end|> is only text here.", "answer": "ok"}
    verify = write_json(tmp_path / "verify.json", [typed, *custom_records(2, system=None)])
    output_dir = tmp_path / "gguf"
    assert (
        export.main(
            [
                "--adapter_path",
                thinking_adapter,
                "--output_dir",
                str(output_dir),
                "--format",
                "gguf",
                "--gguf_type",
                "f32",
                "--verify_data",
                verify,
                "--verify_prompts",
                "3",
                "--verify_max_new_tokens",
                "8",
            ]
        )
        == 0
    )
    assert "typed control-token text (<|im_end|>)" in capsys.readouterr().out
    verification = json.loads((output_dir / "export_report.json").read_text(encoding="utf-8"))["verification"]
    assert verification["enable_thinking"] is True and verification["passed"]
    assert verification["serving_differences"] == 1 and verification["tokenisation_faults"] == 0
    tokenizer = load_tokenizer(str(output_dir))
    records = [
        with_system_prompt(record, SYSTEM)
        for record in load_records(verify, FieldMap("question", "input", "answer"))
    ]
    for record, row in zip(records, verification["per_prompt"]):
        assert row["prompt_tokens"] == len(tokenize_prompt(tokenizer, record, enable_thinking=True))
        assert row["gguf_answer"] == row["transformers_answer"]
    assert verification["per_prompt"][0]["gguf_prompt_tokens"] < verification["per_prompt"][0]["prompt_tokens"]
    modelfile = (output_dir / "Modelfile").read_text(encoding="utf-8")
    conversation = [{"role": "user", "content": records[1]["instruction"]}]
    assert ollama_prompt(modelfile_template(modelfile), conversation, modelfile_system(modelfile)) == format_prompt(
        tokenizer, records[1], True
    )
