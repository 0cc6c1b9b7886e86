"""FSDP2: the training command under `accelerate launch --config_file configs/fsdp2_lora.yaml` with two CPU processes.

accelerate 1.16 makes FSDP only of a world of GPUs: on CPU processes it runs plain DDP whatever the config says,
so the kit refuses that launch (the last test gives the check the environment that launch gives each rank).
tests/fsdp_probe.py runs the unchanged command with the one decision accelerate makes on GPUs made for the CPU
world too (MULTI_CPU -> FSDP); from there accelerate's own FSDP2 path shards every weight with ``fully_shard``
over gloo, one unit per decoder layer, and the kit saves, records and publishes the run as it would on GPUs.

One module fixture starts two launches at once (they share the CPU): the FSDP2 run (2 processes x 2 examples)
and a 1-process run with the same global batch of 4 (the reference). With lora_dropout 0 and plain SGD, a step
on 2 x 2 examples whose gradients are averaged equals one step on the 4 examples, so the two adapters agree to
fp32 rounding only if each rank trained on its own half of each batch and FSDP's reduce-scatter averaged the
gradients (every rank on the same half, or gradients left unreduced, moved the adapter 7.6e-2 / 6.6e-2 away).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_distributed import TRAIN_FLAGS as DDP_TRAIN_FLAGS
from test_distributed import Launch, adapter_config, assert_same_logits_as, child_env, sixteen_records, trained

# One worker runs this module (pytest-xdist --dist loadgroup), so its launches start once, not once per worker.
pytestmark = pytest.mark.xdist_group("fsdp")

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "fsdp2_lora.yaml"
WORLD_SIZE = 2
TRAIN_FLAGS = DDP_TRAIN_FLAGS  # the DDP test's run (3 SGD steps, no dropout); --use_cpu True makes a gloo group, which the probe makes an FSDP world
# fp32 has a 1.2e-7 relative step. The 1-process run sums each step's loss over one padding-free row of 4 examples,
# the FSDP run over two rows of 2 and then reduce-scatters; the same terms in another order differ by a few
# rounding steps per sum, compounded over 3 steps. Measured here (2 CPU cores): 1.3e-7, with lora_B moved to 6.6e-2;
# a rank on the wrong data or gradients left unreduced differ by more than 1e-2 (see the module docstring).
TOLERANCE = 1e-5


def fsdp_launch(log_dir: Path) -> list[str]:
    # --main_process_port 0 picks a free port (another test run may hold 29500); --monitor_interval gives a failing rank
    # time to print its own error before the others are stopped; --tee 3 keeps each rank's output in --log_dir.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", str(WORLD_SIZE),
            "--main_process_port", "0", "--monitor_interval", "2", "--log_dir", str(log_dir), "--tee", "3"]


def start(command: list[str], output_dir: Path, log_dir: Path | None = None, **env) -> Launch:
    process = subprocess.Popen(command, cwd=REPO, env={**child_env(), **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    return Launch(output_dir, process, log_dir)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = sixteen_records(root)
    flags = ["--data_path", str(data), *TRAIN_FLAGS]
    probe = root / "probe"
    probe.mkdir()
    runs = {
        "fsdp": start([*fsdp_launch(root / "fsdp_logs"), str(REPO / "tests" / "fsdp_probe.py"), *flags,
                       "--output_dir", str(root / "fsdp"), "--per_device_train_batch_size", "2"],
                      root / "fsdp", root / "fsdp_logs", PROBE_DIR=str(probe), PYTHONPATH=str(REPO)),
        "single": start([sys.executable, "-m", "qwen_helpers.train_lora", *flags, "--output_dir", str(root / "single"),
                         "--per_device_train_batch_size", str(2 * WORLD_SIZE)], root / "single"),
    }
    finished = {name: launch.wait(timeout=400) for name, launch in runs.items()}
    finished["probe"] = probe
    return finished


def probe_notes(launches) -> dict[int, list[dict]]:
    folder = launches["probe"]
    return {rank: [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()] for rank in range(WORLD_SIZE)}


def test_fsdp2_shards_every_weight_across_the_two_ranks(launches):
    fsdp = trained(launches["fsdp"])
    notes = probe_notes(launches)
    from safetensors.torch import load_file

    lora_tensors = len(load_file(fsdp.output_dir / "adapter_model.safetensors"))
    for rank, rank_notes in notes.items():
        assert [note["step"] for note in rank_notes] == [0, 1, 2]
        for note in rank_notes:
            assert (note["distributed_type"], note["fsdp_version"], note["world_size"]) == ("FSDP", 2, WORLD_SIZE)
            assert "FSDPQwen2DecoderLayer" in note["fsdp_units"]  # the config's TRANSFORMER_BASED_WRAP unit
            assert note["sharded_parameters"] == note["parameters"]  # every weight is a DTensor shard, frozen or not
            assert note["trainable_sharded"] == lora_tensors  # the LoRA weights are sharded like the rest
    # each rank holds its own part of every weight, and the parts add up to the whole model
    assert sum(notes[rank][0]["local_numel"] for rank in notes) == notes[0][0]["whole_numel"]
    assert max(notes[rank][0]["local_numel"] for rank in notes) < 0.6 * notes[0][0]["whole_numel"]

    rank0, rank1 = fsdp.rank_log(0), fsdp.rank_log(1)
    assert "rank 0/2 ready" in rank0 and "rank 1/2 ready" in rank1
    assert "distributed: FSDP2, world size 2; global batch 2 per device x 1 accumulation x 2 processes = 4" in rank0
    assert rank0.count("adapter saved to") == 1 and "adapter saved to" not in rank1 and "loss:" not in rank1


def test_fsdp_adapter_matches_a_one_process_run_on_the_same_global_batch(launches):
    from safetensors.torch import load_file

    sharded = load_file(trained(launches["fsdp"]).output_dir / "adapter_model.safetensors")
    reference = load_file(trained(launches["single"]).output_dir / "adapter_model.safetensors")
    assert sharded.keys() == reference.keys()  # gathered whole, under the names a 1-process run saves
    assert all(sharded[name].shape == reference[name].shape for name in reference)
    moved = max(weight.abs().max().item() for name, weight in reference.items() if "lora_B" in name)
    assert moved > 1e-2, "lora_B starts at zero: training must move it for the comparison to mean anything"
    worst = max((sharded[name] - reference[name]).abs().max().item() for name in reference)
    print(f"max |FSDP2 - 1 process| over the adapter: {worst:.3g} (lora_B moved up to {moved:.3g})")
    assert worst < TOLERANCE, f"the FSDP2 adapter differs from the 1-process one by {worst}"


def test_fsdp_run_folder_is_published_once_like_a_one_process_run(launches):
    from qwen_helpers.common.files import staging_folders

    fsdp, single = trained(launches["fsdp"]), trained(launches["single"])
    assert sorted(os.listdir(fsdp.output_dir)) == sorted(os.listdir(single.output_dir))
    assert staging_folders(fsdp.output_dir) == []  # the staging folder became the output folder, none left beside it
    history = json.loads((fsdp.output_dir / "loss_history.json").read_text(encoding="utf-8"))
    assert [record["step"] for record in history if "loss" in record] == [1, 2, 3]  # logged once, not once per rank
    assert adapter_config(fsdp.output_dir) == adapter_config(single.output_dir)
    run = json.loads((fsdp.output_dir / "run_config.json").read_text(encoding="utf-8"))
    assert run["distributed"] == "FSDP2, world size 2; global batch 2 per device x 1 accumulation x 2 processes = 4"
    assert "distributed" not in json.loads((single.output_dir / "run_config.json").read_text(encoding="utf-8"))


def test_fsdp_adapter_loads_for_inference_like_a_one_process_one(launches, tiny_path, capsys):
    from qwen_helpers import inference

    fsdp, single = trained(launches["fsdp"]), trained(launches["single"])
    assert inference.main(["--adapter_path", str(fsdp.output_dir), "--instruction", "Name a colour.", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()  # one answer printed (its text is a random model's)

    assert_same_logits_as(fsdp.output_dir, single.output_dir, tiny_path)


def test_fsdp2_config_shards_qwen_decoder_layers_with_fully_shard():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Qwen2PreTrainedModel, Qwen3PreTrainedModel

    _, env = launch_environment("--num_processes", "4")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # the final save gathers a whole adapter_model.safetensors
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] in Qwen2PreTrainedModel._no_split_modules
    _, qwen3 = launch_environment("--fsdp_transformer_layer_cls_to_wrap", "Qwen3DecoderLayer")
    assert qwen3["FSDP_TRANSFORMER_CLS_TO_WRAP"] in Qwen3PreTrainedModel._no_split_modules
    with pytest.MonkeyPatch.context() as patch:  # the plugin accelerate builds from those variables accepts them
        for key, value in env.items():
            patch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


def launch_environment(*flags: str):
    """What `accelerate launch --config_file configs/fsdp2_lora.yaml` gives each rank, computed without starting anything."""
    from test_distributed import accelerate_launch

    return accelerate_launch(CONFIG, *flags)


def test_fsdp_launch_on_cpu_processes_is_refused_in_one_line(monkeypatch, tmp_path):
    from qwen_helpers.common.errors import FlagError
    from qwen_helpers.run.config import KitTrainingArguments
    from qwen_helpers.training.plan import check_distributed_launch

    args = KitTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    check_distributed_launch(args)  # no FSDP asked: a CPU run goes ahead
    _, env = launch_environment()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", env["ACCELERATE_USE_FSDP"])  # what the launch tells each rank
    with pytest.raises(FlagError, match=r"FSDP needs GPUs; to try several processes on a CPU, launch with configs/ddp\.yaml"):
        check_distributed_launch(args)
