"""The benchmark: preset shapes, exact trainable counts, the memory estimator, OOM rows and the command's files."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from qwen_helpers.benchmark import (
    GIB,
    RUNS,
    BenchmarkArguments,
    add_baseline,
    add_plain_ratios,
    add_speed_relative_to_full,
    estimate_memory,
    is_out_of_memory,
    parse_methods,
)
from qwen_helpers.benchmark.estimate import causal_context
from qwen_helpers.benchmark.plan import lognormal_lengths, records_of_length
from qwen_helpers.common.presets import (
    check_preset_fits_device,
    count_preset_parameters,
    lora_trainable_parameters,
    meta_model,
    preset_config,
)

PUBLIC_PARAMETER_COUNTS = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "qwen3-8b": 8_190_735_360}

# Peak GiB measured with plain transformers + peft on one H200, seq 512 x batch 8
# (docs/benchmarks/reference-h200-2026-11-28/plain_hf_h200_2026-11-28.json and plain_hf_plus_liger_h200_2026-11-28.json).
H200_PEAKS = [
    # preset, method, dtype, gradient checkpointing, liger, measured peak GiB
    ("qwen2.5-0.5b", "lora_bf16", "bf16", False, False, 12.39),
    ("qwen2.5-0.5b", "prompt_tuning", "fp16", False, False, 12.12),
    ("qwen2.5-0.5b", "qlora_nf4", "bf16", False, False, 15.08),
    ("qwen2.5-0.5b", "full", "bf16", False, False, 19.61),
    ("qwen2.5-7b", "lora_bf16", "bf16", False, False, 41.63),
    ("qwen2.5-7b", "lora_bf16", "bf16", True, False, 22.07),
    ("qwen2.5-7b", "qlora_nf4", "bf16", False, False, 47.81),
    ("qwen2.5-7b", "qlora_nf4", "bf16", True, False, 16.88),
    ("qwen2.5-0.5b", "lora_bf16", "bf16", False, True, 4.27),
    ("qwen2.5-7b", "lora_bf16", "bf16", True, True, 15.76),
]


@pytest.mark.parametrize("name", list(PUBLIC_PARAMETER_COUNTS))
def test_preset_parameter_counts_equal_public_figures(name):
    assert count_preset_parameters(preset_config(name)) == PUBLIC_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-8b"])
def test_meta_instantiation_has_the_public_parameter_count(name):
    model = meta_model(preset_config(name))
    assert next(model.parameters()).device.type == "meta"  # no memory was allocated
    assert sum(parameter.numel() for parameter in model.parameters()) == PUBLIC_PARAMETER_COUNTS[name]


def test_trainable_counts_per_method_are_exact():
    from qwen_helpers.run.config import LoraArguments, PromptTuningArguments
    from qwen_helpers.models.loading import count_parameters
    from qwen_helpers.training.sft import attach_adapter

    config = preset_config("qwen2.5-0.5b")
    lora = attach_adapter(meta_model(config), "lora", "qwen2.5-0.5b", lora_args=LoraArguments(lora_r=8))
    prompt = attach_adapter(meta_model(config), "prompt_tuning", "qwen2.5-0.5b",
                            prompt_args=PromptTuningArguments(num_virtual_tokens=20, prompt_tuning_init="RANDOM"))
    assert count_parameters(lora).trainable == 737_280
    assert count_parameters(prompt).trainable == 20 * config.hidden_size == 17_920
    assert lora_trainable_parameters(config, ["q_proj", "k_proj", "v_proj"], 8) == 737_280
    assert estimate_memory(config, "lora_bf16", 512, 8, False)["trainable_parameters"] == 737_280
    assert estimate_memory(config, "prompt_tuning", 512, 8, False)["trainable_parameters"] == 17_920
    assert estimate_memory(config, "full", 512, 8, False)["trainable_parameters"] == 494_032_768


@pytest.mark.parametrize("method", list(RUNS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_parts_add_up_to_the_total(method, checkpointing):
    estimate = estimate_memory(preset_config("qwen2.5-7b"), method, 512, 8, checkpointing, "bf16")
    assert sum(estimate["parts"].values()) == estimate["total_bytes"]
    assert all(value >= 0 for value in estimate["parts"].values())


def test_estimate_orders_methods_and_checkpointing_sensibly():
    config = preset_config("qwen2.5-7b")
    lora = estimate_memory(config, "lora_bf16", 512, 8, False)
    lora_checkpointed = estimate_memory(config, "lora_bf16", 512, 8, True)
    qlora_checkpointed = estimate_memory(config, "qlora_nf4", 512, 8, True)
    full = estimate_memory(config, "full", 512, 8, False)
    assert lora_checkpointed["total_bytes"] < lora["total_bytes"] < full["total_bytes"]
    assert qlora_checkpointed["total_bytes"] < lora_checkpointed["total_bytes"]
    assert full["parts"]["AdamW moments (2 x fp32)"] == 8 * 7_615_616_512


@pytest.mark.parametrize("preset, method, dtype, checkpointing, liger, measured", H200_PEAKS)
def test_estimate_within_20_percent_of_h200_measurements(preset, method, dtype, checkpointing, liger, measured):
    estimate = estimate_memory(preset_config(preset), method, 512, 8, checkpointing, dtype, use_liger=liger)
    assert estimate["total_bytes"] / GIB == pytest.approx(measured, rel=0.2)


def test_parse_methods_and_oom_detection():
    assert len(parse_methods("all", "both")) == 2 * len(RUNS)
    assert parse_methods("lora_bf16,full", "on") == [("lora_bf16", True), ("full", True)]
    with pytest.raises(ValueError, match="lora_fp32"):
        parse_methods("lora_fp32")
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(ValueError("shape mismatch"))


def test_big_presets_are_refused_on_cpu():
    with pytest.raises(ValueError, match="GPU"):
        check_preset_fits_device("qwen2.5-7b", "cpu")
    check_preset_fits_device("qwen2.5-7b", "cuda")


def test_baseline_figures_sit_beside_matching_rows(tmp_path):
    baseline = [{"method": "lora_bf16", "grad_ckpt": False, "peak_gib": 12.0, "tok_s": 30000.0, "size": "0.5B"},
                {"method": "full_bf16_amp", "grad_ckpt": False, "peak_gib": 20.0, "tok_s": 40000.0, "size": "0.5B"}]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline))
    rows = [{"run": "lora_bf16", "method": "lora_bf16", "gradient_checkpointing": False, "status": "ok", "peak_bytes": 6 * GIB, "tokens_per_second": 45000.0},
            {"run": "full", "method": "full", "gradient_checkpointing": False, "status": "ok", "peak_bytes": 20 * GIB, "tokens_per_second": 30000.0}]
    add_speed_relative_to_full(rows)
    add_baseline(rows, BenchmarkArguments(preset="qwen2.5-0.5b", compare_baseline=str(path)))
    assert rows[0]["memory_vs_baseline"] == pytest.approx(0.5)
    assert rows[0]["speed_vs_baseline"] == pytest.approx(1.5)
    assert rows[1]["baseline_tokens_per_second"] == 40000.0
    assert rows[0]["speed_vs_full"] == pytest.approx(1.5)
    unmatched = [{"run": "lora_bf16", "method": "lora_bf16", "gradient_checkpointing": False, "status": "ok", "peak_bytes": GIB, "tokens_per_second": 1.0}]
    add_baseline(unmatched, BenchmarkArguments(preset="qwen2.5-1.5b", compare_baseline=str(path)))  # no 1.5B rows: no comparison
    assert "baseline_tokens_per_second" not in unmatched[0]


def test_kit_rows_get_ratios_against_their_plain_reference():
    rows = [{"side": "kit", "method": "lora_bf16", "gradient_checkpointing": False, "batching": "padding_free", "status": "ok",
             "peak_bytes": 3 * GIB, "tokens_per_second": 300.0},
            {"side": "plain", "method": "lora_bf16", "gradient_checkpointing": False, "batching": "pad_max", "status": "ok",
             "peak_bytes": 8 * GIB, "tokens_per_second": 50.0},
            {"side": "plain", "method": "lora_bf16", "gradient_checkpointing": False, "batching": "dynamic", "status": "ok",
             "peak_bytes": 6 * GIB, "tokens_per_second": 200.0}]
    add_plain_ratios(rows)
    assert rows[0]["speed_vs_plain"] == pytest.approx(1.5) and rows[0]["memory_vs_plain"] == pytest.approx(0.5)
    assert "speed_vs_plain" not in rows[1]


def test_an_out_of_memory_error_in_a_worker_becomes_an_oom_row(tmp_path, monkeypatch):
    from qwen_helpers.benchmark import worker

    def out_of_memory(spec):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker, "run_row", out_of_memory)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"result_path": str(tmp_path / "row.json")}))
    assert worker.worker_main(str(spec)) == 0
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["status"] == "OOM" and "out of memory" in row["error"]


def test_causal_context_counts_the_keys_each_token_sees():
    assert causal_context([1]) == 1 and causal_context([4]) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert causal_context([2], virtual_tokens=2) == causal_context([4])


def test_synthetic_records_have_the_asked_lengths(tokenizer):
    from qwen_helpers.data.encoding import tokenize_example

    lengths = [64, 100, 333]
    records = records_of_length(tokenizer, lengths)
    assert [len(tokenize_example(tokenizer, record)["input_ids"]) for record in records] == lengths
    drawn = lognormal_lengths(2000, 240, 1024, seed=1)
    assert drawn == lognormal_lengths(2000, 240, 1024, seed=1) and 16 <= min(drawn) and max(drawn) <= 1024
    assert 200 < sum(drawn) / len(drawn) < 260


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CPU run of the command on the tiny model: LoRA and QLoRA, each followed by its plain reference."""
    output = tmp_path_factory.mktemp("benchmark")
    command = [sys.executable, "-m", "qwen_helpers.benchmark", "--preset", "tiny", "--methods", "lora_bf16,qlora_nf4", "--checkpointing", "off",
               "--steps", "2", "--warmup_steps", "1", "--seq_len", "32", "--batch_size", "2", "--output_dir", str(output), "--compare", "plain"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    assert process.returncode == 0, process.stderr[-3000:]
    (folder,) = output.iterdir()
    return folder, process.stdout


def test_command_writes_results_with_kit_and_plain_rows_on_cpu(cli_run):
    folder, stdout = cli_run
    for name in ("results.json", "results.csv", "results.md", "memory.png", "throughput.png"):
        assert (folder / name).stat().st_size > 0, name
    payload = json.loads((folder / "results.json").read_text())
    rows = {row["run"]: row for row in payload["rows"]}
    assert list(rows) == ["lora_bf16", "lora_bf16 (plain)", "qlora_nf4", "qlora_nf4 (plain)"]  # interleaved
    assert payload["environment"]["device"] == "cpu" and payload["environment"]["torch"]
    assert all(row["status"] == "ok" and row["loss_finite"] and row["tokens_per_second"] > 0 for row in rows.values())
    assert rows["lora_bf16"]["trainable"] == rows["lora_bf16 (plain)"]["trainable"] == 20_480
    assert rows["lora_bf16"]["precision"].startswith("fp32 (CPU fallback")
    assert rows["lora_bf16"]["real_tokens_per_step"] == 2 * 32  # every example is exactly --seq_len tokens
    assert rows["lora_bf16"]["speed_vs_plain"] == pytest.approx(rows["lora_bf16"]["tokens_per_second"] / rows["lora_bf16 (plain)"]["tokens_per_second"])
    assert any("padding-free" in note for note in rows["lora_bf16"]["notes"])  # the kit's default path ran
    with open(folder / "results.csv", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    markdown = (folder / "results.md").read_text()
    assert "| run |" in markdown and "kit / plain tokens/s" in markdown and "not GPU figures" in markdown
    assert "Memory estimate before training" in stdout and "kit / plain" in stdout


REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "reference-h200-2026-11-28"
REFERENCE_NAMES = {"full_bf16_amp": "full", "prompt_fp16": "prompt_tuning"}
REFERENCE_PRESETS = {"0.5B": "qwen2.5-0.5b", "7B": "qwen2.5-7b"}


def _reference_rows():
    for name, liger in (("plain_hf_h200_2026-11-28.json", False), ("plain_hf_plus_liger_h200_2026-11-28.json", True)):
        for entry in json.loads((REFERENCE / name).read_text()):
            method = REFERENCE_NAMES.get(entry["method"], entry["method"])
            dtype = "fp16" if method in ("lora_fp16", "prompt_tuning") else "bf16"
            yield REFERENCE_PRESETS[entry["size"]], method, dtype, entry["grad_ckpt"], liger, entry["peak_gib"]


def test_estimate_on_committed_reference_rows_it_was_not_checked_against():
    """The ten H200 rows outside H200_PEAKS (fp16 LoRA, 7B prompt tuning, most Liger rows) are held out from the term choices."""
    used = {(preset, method, checkpointing, liger) for preset, method, _, checkpointing, liger, _ in H200_PEAKS}
    held_out = [row for row in _reference_rows() if (row[0], row[1], row[3], row[4]) not in used]
    assert len(held_out) == 10
    for preset, method, dtype, checkpointing, liger, measured in held_out:
        estimate = estimate_memory(preset_config(preset), method, 512, 8, checkpointing, dtype, use_liger=liger)
        assert estimate["total_bytes"] / GIB == pytest.approx(measured, rel=0.15), (preset, method, checkpointing, liger)


def test_variant_rows_estimate_what_peft_builds():
    from qwen_helpers.run.config import LoraArguments
    from qwen_helpers.models.loading import count_parameters
    from qwen_helpers.training.sft import attach_adapter

    config = preset_config("qwen2.5-0.5b")
    dora = attach_adapter(meta_model(config), "lora", "qwen2.5-0.5b", lora_args=LoraArguments(lora_r=8, use_dora=True))
    lora = estimate_memory(config, "lora_bf16", 512, 8, False)
    assert estimate_memory(config, "lora_dora", 512, 8, False)["trainable_parameters"] == count_parameters(dora).trainable
    assert count_parameters(dora).trainable > lora["trainable_parameters"]
    assert estimate_memory(config, "lora_dora", 512, 8, False)["total_bytes"] > lora["total_bytes"]
    for same_cost in ("lora_rslora", "lora_pissa", "lora_loraplus"):  # an option of the same matrices and optimiser state
        assert estimate_memory(config, same_cost, 512, 8, False)["total_bytes"] == lora["total_bytes"]
    assert [name for name, _ in parse_methods("variants", "off")] == ["lora_bf16", "lora_dora", "lora_rslora", "lora_pissa",
                                                                     "lora_loraplus"]


def test_variant_rows_get_ratios_against_the_lora_row():
    from qwen_helpers.benchmark.report import add_speed_relative_to_lora, markdown_table

    common = {"side": "kit", "gradient_checkpointing": False, "batching": "kit default", "status": "ok", "precision": "bf16"}
    rows = [{**common, "method": "lora_bf16", "peak_bytes": 4 * GIB, "tokens_per_second": 400.0},
            {**common, "method": "lora_dora", "peak_bytes": 5 * GIB, "tokens_per_second": 300.0},
            {**common, "method": "lora_loraplus", "precision": "fp16", "peak_bytes": 4 * GIB, "tokens_per_second": 400.0}]
    add_speed_relative_to_lora(rows)
    assert rows[1]["speed_vs_lora"] == pytest.approx(0.75) and rows[1]["memory_vs_lora"] == pytest.approx(1.25)
    assert "speed_vs_lora" not in rows[0] and "speed_vs_lora" not in rows[2]  # the reference itself; another precision
    assert "tokens/s vs LoRA" in markdown_table([{**row, "run": row["method"], "trainable": 1, "trainable_percent": 1.0,
                                                  "estimate_bytes": GIB} for row in rows])


# ---------------------------------------------------------------- DPO and GRPO rows (TRL's trainers on LoRA)


def test_dpo_and_grpo_rows_estimate_their_trainers_steps():
    config = preset_config("qwen2.5-7b")
    lora, dpo, grpo = (estimate_memory(config, name, 512, 8, False) for name in ("lora_bf16", "dpo_lora", "grpo_lora"))
    assert dpo["trainable_parameters"] == grpo["trainable_parameters"] == lora["trainable_parameters"]
    # the reference is the same weights with the adapter off: no second copy of the base
    assert dpo["parts"]["weights (bf16)"] == grpo["parts"]["weights (bf16)"] == lora["parts"]["weights (bf16)"]
    assert dpo["tokens_per_step"] == 2 * lora["tokens_per_step"] == 2 * grpo["tokens_per_step"]  # chosen + rejected
    activations = "activations (layers x tokens)"
    assert dpo["parts"][activations] == 2 * lora["parts"][activations] and grpo["parts"][activations] == lora["parts"][activations]
    for estimate in (dpo, grpo):  # TRL's fused LM head: one tile of logits, never the SFT step's three full copies
        assert not any(name.startswith("logits (tokens") for name in estimate["parts"])
        assert any(name.startswith("fused LM head") for name in estimate["parts"])
        assert estimate["parts"]["reference log-probs (adapter off, same weights; fp32 per token)"] == 4 * estimate["tokens_per_step"]
        assert sum(estimate["parts"].values()) == estimate["total_bytes"]
    assert grpo["total_bytes"] < lora["total_bytes"]  # same tokens, no full logits
    without_kl = estimate_memory(config, "grpo_lora", 512, 8, False, reference_model=False)
    assert grpo["total_bytes"] - without_kl["total_bytes"] == 4 * grpo["tokens_per_step"]
    # generation's KV cache is freed before the step: it counts only where it exceeds the step's activations
    generation = "generation: KV cache beyond the step's activations (freed before training)"
    assert grpo["parts"][generation] == 0
    checkpointed = estimate_memory(config, "grpo_lora", 512, 8, True)
    assert checkpointed["parts"][generation] >= 0 and checkpointed["total_bytes"] < grpo["total_bytes"]


def test_trl_rows_are_refused_where_they_cannot_run():
    with pytest.raises(ValueError, match="--batch_size 3: grpo_lora needs an even number"):
        BenchmarkArguments(methods="grpo_lora", batch_size=3)
    with pytest.raises(ValueError, match="dpo_lora run on fixed-shape data only"):
        BenchmarkArguments(methods="dpo_lora", data="lognormal")
    assert [name for name, _ in parse_methods("trl", "off")] == ["dpo_lora", "grpo_lora"]


def test_dpo_and_grpo_rows_run_the_kits_trl_path_on_cpu(tmp_path):
    """One command: DPO (train_dpo) and GRPO (train_grpo) rows with real TRL trainers, GRPO's generation timed apart."""
    command = [sys.executable, "-m", "qwen_helpers.benchmark", "--preset", "tiny", "--methods", "trl", "--checkpointing", "off",
               "--steps", "2", "--warmup_steps", "1", "--seq_len", "32", "--batch_size", "2", "--output_dir", str(tmp_path),
               "--compare", "plain"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert process.returncode == 0, process.stderr[-3000:]
    (folder,) = tmp_path.iterdir()
    rows = {row["run"]: row for row in json.loads((folder / "results.json").read_text())["rows"]}
    assert list(rows) == ["dpo_lora", "grpo_lora"]  # TRL is the reference: no plain twin
    dpo, grpo = rows["dpo_lora"], rows["grpo_lora"]
    assert all(row["status"] == "ok" and row["loss_finite"] and row["trainable"] == 20_480 for row in rows.values()), rows
    assert dpo["real_tokens_per_step"] == 2 * 2 * 32  # 2 pairs, chosen and rejected, each exactly --seq_len tokens
    assert dpo["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts equal to its reference
    assert grpo["real_tokens_per_step"] == 2 * 32  # 2 completions, generated to the full --seq_len
    assert grpo["generation_calls"] == 2 and grpo["generation_seconds_per_step"] > 0  # one sampling per timed step
    assert grpo["generation_seconds_per_step"] + grpo["optimisation_seconds_per_step"] == pytest.approx(grpo["step_seconds"])
    assert grpo["optimisation_tokens_per_second"] > grpo["tokens_per_second"]
    assert "generation s/step" in (folder / "results.md").read_text() and "generation" in process.stdout


# ---------------------------------------------------------------- the TRL SFTTrainer reference and interleaved rounds


def test_compare_names_its_references_and_repeats_are_checked():
    from qwen_helpers.benchmark.plan import plan_rows

    assert BenchmarkArguments(compare="trl,plain").references() == ["plain", "trl"]  # run order: plain, then TRL
    assert BenchmarkArguments().references() == []
    with pytest.raises(ValueError, match="--compare tlr: use 'none', 'plain', 'trl' or 'plain,trl'"):
        BenchmarkArguments(compare="tlr")
    with pytest.raises(ValueError, match="--repeats must be at least 1"):
        BenchmarkArguments(repeats=0)
    rows = plan_rows(BenchmarkArguments(methods="lora_bf16,dpo_lora", checkpointing="off", compare="plain,trl"), [32])
    assert [(row["side"], row["method"]) for row in rows] == [("kit", "lora_bf16"), ("plain", "lora_bf16"), ("trl", "lora_bf16"),
                                                              ("kit", "dpo_lora")]  # TRL's DPO trainer is its own reference
    varlen = plan_rows(BenchmarkArguments(methods="lora_bf16", data="lognormal", batching="dynamic,padding_free", compare="trl"), [32])
    assert [(row["side"], row["batching"]) for row in varlen] == [("kit", "dynamic"), ("plain", "dynamic"), ("kit", "padding_free"),
                                                                  ("trl", "padding_free")]  # TRL's own padding-free batches


def test_run_order_interleaves_rounds_and_rotates_the_sides():
    from qwen_helpers.benchmark.plan import plan_rows, run_order

    rows = plan_rows(BenchmarkArguments(methods="lora_bf16,full", checkpointing="off", compare="plain,trl"), [32])
    order = [(rows[index]["method"], rows[index]["side"], round_index) for index, round_index in run_order(rows, 3)]
    assert [side for method, side, _ in order if method == "lora_bf16"] == ["kit", "plain", "trl", "plain", "trl", "kit",
                                                                           "trl", "kit", "plain"]
    assert [method for method, _, _ in order] == ["lora_bf16"] * 9 + ["full"] * 9  # a method's rounds back to back
    assert [index for index, _ in run_order(rows, 1)] == list(range(len(rows)))  # one round: the planned order


def test_rounds_merge_into_medians_and_ratios_divide_figures_of_the_same_round():
    """The machine is 1x, 2.5x and 0.6x as fast in rounds 0-2: a ratio of medians across rounds (100 / 50 = 2.0) would
    pool different moments; the per-round ratios are 2.5, 3.0 and 1.2, so the reported ratio is their median, 2.5."""
    from qwen_helpers.benchmark.report import add_reference_ratios, markdown_table, merge_rounds

    def rounds(side, speeds, peak):
        return [{"side": side, "method": "lora_bf16", "gradient_checkpointing": False, "batching": "kit default" if side == "kit" else None,
                 "run": side, "status": "ok", "round": index, "tokens_per_second": speed, "tokens_per_cpu_second": speed / 2,
                 "peak_bytes": peak, "trainable": 1, "trainable_percent": 1.0, "estimate_bytes": GIB, "trained_tokens_per_step": 34}
                for index, speed in enumerate(speeds)]

    kit, plain = merge_rounds(rounds("kit", [100.0, 300.0, 60.0], GIB)), merge_rounds(rounds("plain", [40.0, 100.0, 50.0], 2 * GIB))
    trl = merge_rounds(rounds("trl", [100.0, 300.0, 60.0], GIB))
    assert kit["tokens_per_second"] == 100.0 and kit["repeats"] == 3 and [run["round"] for run in kit["runs"]] == [0, 1, 2]
    assert plain["tokens_per_second"] == 50.0 and "round" not in kit
    rows = [kit, plain, trl]
    add_reference_ratios(rows, "plain")
    add_reference_ratios(rows, "trl")
    assert kit["speed_vs_plain"] == pytest.approx(2.5) and (kit["speed_vs_plain_min"], kit["speed_vs_plain_max"]) == pytest.approx((1.2, 3.0))
    assert kit["cpu_time_speed_vs_plain"] == pytest.approx(2.5) and kit["memory_vs_plain"] == pytest.approx(0.5)
    assert kit["speed_vs_trl"] == kit["speed_vs_trl_min"] == kit["speed_vs_trl_max"] == pytest.approx(1.0)
    assert "speed_vs_plain" not in plain and "speed_vs_trl" not in trl  # references get no ratio to themselves
    table = markdown_table(rows)
    assert "kit / TRL tokens/s" in table and "**2.50x** (1.20-3.00)" in table and "**1.00x** (1.00-1.00)" in table
    failed = merge_rounds([*rounds("kit", [100.0], GIB), {"status": "OOM", "error": "out of memory", "round": 1}])
    assert failed["status"] == "OOM" and failed["repeats"] == 2  # a failed round is never hidden by a median


def test_trl_reference_tokenises_exactly_the_kits_examples(tokenizer, tiny_path, tmp_path):
    """TRL's SFTTrainer, as the TRL row builds it, on synthetic and real records: the same input ids and the same
    trained labels as the kit's tokenisation (the answer and <|im_end|>; not the newlines TRL's conversational paths add)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from qwen_helpers.benchmark.trl_reference import completion_records, trl_sft_config
    from qwen_helpers.data.encoding import tokenize_example

    records = records_of_length(tokenizer, [40, 90]) + json.loads((Path(__file__).parent.parent / "data" / "train.json").read_text())[:3]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    spec = {"args": {"warmup_steps": 1, "steps": 1, "batch_size": 2, "use_liger_kernel": False, "torch_compile": False},
            "work_dir": str(tmp_path), "precision": "fp32", "gradient_checkpointing": False, "device": "cpu",
            "method_spec": {"prepends_virtual_tokens": False}}
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=trl_sft_config(spec),
                         train_dataset=Dataset.from_list(completion_records(tokenizer, str(path))), processing_class=tokenizer)
    assert trainer.args.padding_free and trainer.args.completion_only_loss
    for record, example in zip(records, trainer.train_dataset, strict=True):
        kit = tokenize_example(tokenizer, record)
        assert example["input_ids"] == kit["input_ids"] and example["labels"] == kit["labels"]


def test_the_estimate_ratio_can_be_checked_from_the_table():
    """On a CPU the ratio divides by the peak RSS above the start, not the peak column beside it: the cell says what
    it divided, so estimate / measured is derivable from what the table shows (notebook 06 printed 0.31 beside
    columns whose quotient was another number)."""
    from qwen_helpers.benchmark.report import MIB, estimate_ratio_cell

    cpu = {"estimate_ratio": 0.5, "estimate_bytes": 100 * MIB, "estimate_measured_bytes": 200 * MIB, "peak_bytes": 900 * MIB}
    assert estimate_ratio_cell(cpu) == "0.50 (100 / 200 MiB above start)"
    gpu = {**cpu, "estimate_measured_bytes": 900 * MIB}
    assert estimate_ratio_cell(gpu) == "0.50" and estimate_ratio_cell({"estimate_ratio": None}) == ""
