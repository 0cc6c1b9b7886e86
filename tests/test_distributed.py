"""Scale-out: the training command under torchrun with two CPU processes, and the configs in configs/.

One module fixture starts three launches at once (they share the CPU): a 2-process LoRA run, a 1-process
run with the same global batch (the reference), and a 2-process run into a non-empty folder (must refuse).
With lora_dropout 0 and plain SGD, a data-parallel step on 2 x 2 examples equals a single step on the same
4 examples, so the two adapters agree to float rounding only if the ranks' gradients were averaged.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# one worker runs the whole module under --dist loadgroup: its module fixture (three launches) then runs once, not
# once per worker that happens to get one of its tests
pytestmark = pytest.mark.xdist_group("distributed")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
WORLD_SIZE = 2
TRAIN_FLAGS = [
    "--max_steps", "3",
    "--max_length", "128",
    "--lora_dropout", "0",  # no dropout: the ranks' forward passes are deterministic
    "--optim", "sgd",  # SGD keeps the update linear in the gradient, so rounding differences stay at rounding size
    "--learning_rate", "0.5",
    "--lr_scheduler_type", "constant",
    "--warmup_steps", "0",
    "--save_strategy", "no",
    "--report_to", "none",
    "--use_cpu", "True",  # without a GPU, torchrun's processes form a gloo group only with --use_cpu
]


@dataclass
class Launch:
    """A launched command: its output folder, combined output, exit code and (for torchrun) per-rank logs."""

    output_dir: Path
    process: subprocess.Popen
    log_dir: Path | None = None
    output: str = ""

    def wait(self, timeout: int) -> "Launch":
        self.output, _ = self.process.communicate(timeout=timeout)
        return self

    def rank_log(self, rank: int, stream: str = "stdout") -> str:
        """What one rank wrote, from torchrun's --log_dir (one folder per rank)."""
        (path,) = self.log_dir.glob(f"*/attempt_0/{rank}/{stream}.log")
        return path.read_text(encoding="utf-8")


def child_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def start(command: list[str], output_dir: Path, log_dir: Path | None = None) -> Launch:
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Launch(output_dir, process, log_dir)


def torchrun(log_dir: Path) -> list[str]:
    # --standalone picks a free port (other test runs may hold 29500); --monitor-interval gives a failing rank
    # time to print its own error before torchrun stops the others.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
            "--monitor-interval", "2", "--log_dir", str(log_dir), "--redirects", "3"]


def sixteen_records(root: Path) -> Path:
    """The first 16 records of data/train.json in a file of the launches' own: 4 steps of 2 x 2 examples."""
    data = root / "train16.json"
    records = json.loads((REPO / "data" / "train.json").read_text(encoding="utf-8"))[:16]
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return data


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data = sixteen_records(root)
    train_lora = ["-m", "qwen_helpers.train_lora", "--data_path", str(data), *TRAIN_FLAGS]
    occupied = root / "occupied"
    occupied.mkdir()
    (occupied / "earlier_run.txt").write_text("an earlier run's file", encoding="utf-8")

    runs = {
        "ddp": start([*torchrun(root / "ddp_logs"), *train_lora, "--output_dir", str(root / "ddp"),
                      "--per_device_train_batch_size", "2"], root / "ddp", root / "ddp_logs"),
        "single": start([sys.executable, *train_lora, "--output_dir", str(root / "single"),
                         "--per_device_train_batch_size", str(2 * WORLD_SIZE)], root / "single"),
        "refused": start([*torchrun(root / "refused_logs"), *train_lora, "--output_dir", str(occupied)],
                         occupied, root / "refused_logs"),
    }
    return {name: launch.wait(timeout=400) for name, launch in runs.items()}


def trained(launch: Launch) -> Launch:
    """The launch, after checking that it succeeded (showing what rank 0 wrote if it did not)."""
    if launch.process.returncode != 0:
        rank0_errors = launch.rank_log(0, "stderr") if launch.log_dir else ""
        pytest.fail(f"exit code {launch.process.returncode}:\n{launch.output[-2000:]}\n{rank0_errors[-3000:]}")
    return launch


def test_two_ranks_ran_in_one_world_and_only_rank_0_reports(launches):
    ddp = trained(launches["ddp"])
    rank0, rank1 = ddp.rank_log(0), ddp.rank_log(1)
    assert "rank 0/2 ready" in rank0
    assert "rank 1/2 ready" in rank1
    assert f"world size {WORLD_SIZE}" in rank0
    assert rank0.count("trainable params") == 1 and rank0.count("adapter saved to") == 1
    assert "trainable params" not in rank1 and "adapter saved to" not in rank1 and "loss:" not in rank1


def test_gradients_were_averaged_across_ranks(launches):
    from safetensors.torch import load_file

    distributed = load_file(trained(launches["ddp"]).output_dir / "adapter_model.safetensors")
    reference = load_file(trained(launches["single"]).output_dir / "adapter_model.safetensors")
    assert distributed.keys() == reference.keys()
    moved = max(weight.abs().max().item() for name, weight in reference.items() if "lora_B" in name)
    assert moved > 1e-2, "lora_B starts at zero: training must move it for the comparison to mean anything"
    worst = max((distributed[name] - reference[name]).abs().max().item() for name in reference)
    assert worst < 1e-5, f"the 2-process adapter differs from the 1-process one by {worst}"


def test_one_run_folder_with_the_same_files_as_a_single_process_run(launches):
    ddp, single = trained(launches["ddp"]), trained(launches["single"])
    assert sorted(os.listdir(ddp.output_dir)) == sorted(os.listdir(single.output_dir))
    history = json.loads((ddp.output_dir / "loss_history.json").read_text(encoding="utf-8"))
    assert [record["step"] for record in history if "loss" in record] == [1, 2, 3]  # logged once, not once per rank
    assert adapter_config(ddp.output_dir) == adapter_config(single.output_dir)


def adapter_config(folder: Path) -> dict:
    """adapter_config.json with target_modules sorted (peft writes a set, whose order changes between processes)."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return {**config, "target_modules": sorted(config["target_modules"])}


def assert_same_logits_as(adapter_dir: Path, reference_dir: Path, tiny_path) -> None:
    """Both adapters load on one tiny base with plain peft and give the same logits, and not the base's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    input_ids = torch.tensor([[9707, 1879, 151645, 151643]])  # "Hello world<|im_end|><|endoftext|>"
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids).logits
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="trained")
    model.load_adapter(str(reference_dir), adapter_name="reference")

    def logits(adapter_name: str):
        model.set_adapter(adapter_name)
        with torch.no_grad():
            return model(input_ids).logits

    trained_logits = logits("trained")
    assert torch.allclose(trained_logits, logits("reference"), atol=1e-4)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)  # the adapter is applied, not ignored


def test_distributed_adapter_loads_with_plain_peft_like_a_single_process_one(launches, tiny_path):
    assert_same_logits_as(trained(launches["ddp"]).output_dir, trained(launches["single"]).output_dir, tiny_path)


def test_every_rank_refuses_a_non_empty_output_dir(launches):
    refused = launches["refused"]
    assert refused.process.returncode != 0
    for rank in range(WORLD_SIZE):
        assert "error: --output_dir" in refused.rank_log(rank, "stderr")  # one line from the command boundary, on every rank
    assert sorted(os.listdir(refused.output_dir)) == ["earlier_run.txt"]



def gloo_available() -> bool:
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


BUDGET = 150  # 16 examples of 36-108 tokens (max_length 256) make 7 padding-free batches: an odd count for 2 ranks


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with the gloo backend is not available in this PyTorch build")
def test_token_budget_batches_under_ddp_are_per_rank_disjoint_and_even(tmp_path):
    """torchrun x 2 on train_lora --token_budget (tests/budget_probe.py records each rank's micro-batches, the command runs as is)."""
    from qwen_helpers.common.files import staging_folders

    records = json.loads((REPO / "data" / "train.json").read_text(encoding="utf-8"))[:16]
    data = tmp_path / "train16.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    probe, output = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    flags = ["--data_path", str(data), "--output_dir", str(output), "--max_length", "256", "--token_budget", str(BUDGET),
             "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--save_strategy", "no", "--report_to", "none",
             "--use_cpu", "True", "--disable_tqdm", "True"]
    process = subprocess.Popen([*torchrun(tmp_path / "logs"), str(REPO / "tests" / "budget_probe.py"), *flags], cwd=REPO,
                               env={**child_env(), "PROBE_DIR": str(probe), "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launch = trained(Launch(output, process, tmp_path / "logs").wait(timeout=300))  # a rank left without a batch would hang here
    rank0, rank1 = launch.rank_log(0), launch.rank_log(1)
    assert "rank 0/2 ready" in rank0 and "rank 1/2 ready" in rank1
    assert f"global batch up to {BUDGET} tokens per device x 2 accumulation x 2 processes = up to {4 * BUDGET} tokens" in rank0
    batches = int(re.search(rf"token budget {BUDGET} \(padding-free tokens\): (\d+) batches", rank0).group(1))
    assert batches % WORLD_SIZE == 1, "the data must make an odd number of batches for the uneven case to be tested"

    notes = {rank: [json.loads(line) for line in (probe / f"rank{rank}.jsonl").read_text().splitlines()] for rank in range(WORLD_SIZE)}
    per_rank = -(-batches // WORLD_SIZE)  # every rank the same number of micro-batches: the short one repeats a batch
    assert [len(notes[rank]) for rank in range(WORLD_SIZE)] == [2 * per_rank] * WORLD_SIZE
    assert [note["step"] for note in notes[0]] == [note["step"] for note in notes[1]]  # same optimiser steps, in step
    for rank, rank_notes in notes.items():
        for note in rank_notes:
            assert note["world_size"] == WORLD_SIZE and note["padding_free"] is True
            lengths = [len(example) for example in note["examples"]]
            assert sum(lengths) <= BUDGET or len(lengths) == 1, f"rank {rank} step {note['step']}: {lengths} exceeds the budget"

    epochs = []
    for epoch in range(2):
        assert {note["epoch"] for rank in notes for note in notes[rank][epoch * per_rank:(epoch + 1) * per_rank]} == {epoch}
        taken = [tuple(map(tuple, note["examples"])) for rank in range(WORLD_SIZE) for note in notes[rank][epoch * per_rank:(epoch + 1) * per_rank]]
        assert len(set(taken)) == batches  # every batch once, plus the one repeat that evens the ranks out
        examples = [example for batch in set(taken) for example in batch]
        assert len(examples) == len(set(examples)) == 16  # disjoint shards that cover the data
        shard0 = {example for note in notes[0][epoch * per_rank:(epoch + 1) * per_rank] for example in map(tuple, note["examples"])}
        shard1 = {example for note in notes[1][epoch * per_rank:(epoch + 1) * per_rank] for example in map(tuple, note["examples"])}
        assert len(shard0 & shard1) <= max(len(batch) for batch in taken)  # only the repeated batch is shared
        epochs.append(taken)
    assert epochs[0] != epochs[1]  # the batch order is reshuffled per epoch (set_epoch reaches the sampler under DDP)

    steps = 2 * -(-per_rank // 2)  # two epochs of per_rank micro-batches, two per optimiser step
    printed = [float(value) for value in re.findall(r"examples/step ([\d.]+)", rank0)]
    own = [sum(len(note["examples"]) for note in notes[0] if note["step"] == step) for step in range(steps)]
    assert printed == own  # rank 0 logs its own examples per step (accumulation 2: two micro-batches each)
    assert rank0.count("adapter saved to") == 1 and "adapter saved to" not in rank1
    assert (output / "adapter_model.safetensors").is_file() and staging_folders(output) == []  # published once, no staging left
    history = json.loads((output / "loss_history.json").read_text(encoding="utf-8"))
    assert [record["step"] for record in history if "loss" in record] == list(range(1, steps + 1))

def test_launch_that_did_not_become_distributed_is_refused(monkeypatch, tmp_path):
    from qwen_helpers.run.config import KitTrainingArguments
    from qwen_helpers.training.plan import check_distributed_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = KitTrainingArguments(output_dir=str(tmp_path), report_to="none")  # no LOCAL_RANK: a world of one
    with pytest.raises(RuntimeError, match="--use_cpu True"):
        check_distributed_launch(args)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_config_without_deepspeed_names_the_extra(tmp_path):
    from qwen_helpers.cli import parse_training_args

    with pytest.raises(ImportError, match=r"pip install -e '\.\[deepspeed\]'"):
        parse_training_args("lora", ["--output_dir", str(tmp_path), "--deepspeed", str(CONFIGS / "ds_zero3.json")])


def accelerate_launch(config_file: Path, *flags: str):
    """The launch arguments and environment `accelerate launch` would use, computed without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), *flags, "-m", "qwen_helpers.train_lora"])
    _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


def test_ddp_config_is_a_multi_gpu_launch_that_leaves_precision_to_the_kit():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_processes >= 2
    args, env = accelerate_launch(CONFIGS / "ddp.yaml", "--num_processes", "4")
    assert args.multi_gpu and int(args.nproc_per_node) == 4  # the command line overrides the file's num_processes
    assert env["ACCELERATE_MIXED_PRECISION"] == "no" and "ACCELERATE_USE_FSDP" not in env


def test_fsdp_config_full_shards_qwen_decoder_layers_and_keeps_lora_params():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from accelerate.utils.constants import FSDP_AUTO_WRAP_POLICY, FSDP_BACKWARD_PREFETCH, FSDP_SHARDING_STRATEGY, FSDP_STATE_DICT_TYPE
    from transformers import Qwen2PreTrainedModel, Qwen3PreTrainedModel

    assert load_config_from_file(str(CONFIGS / "fsdp_lora.yaml")).distributed_type == DistributedType.FSDP
    _, env = accelerate_launch(CONFIGS / "fsdp_lora.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_RESHARD_AFTER_FORWARD"].upper() in FSDP_SHARDING_STRATEGY
    assert env["FSDP_AUTO_WRAP_POLICY"] in FSDP_AUTO_WRAP_POLICY and env["FSDP_BACKWARD_PREFETCH"] in FSDP_BACKWARD_PREFETCH
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_STATE_DICT_TYPE"] in FSDP_STATE_DICT_TYPE
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] in Qwen2PreTrainedModel._no_split_modules
    _, qwen3 = accelerate_launch(CONFIGS / "fsdp_lora.yaml", "--fsdp_transformer_layer_cls_to_wrap", "Qwen3DecoderLayer")
    assert qwen3["FSDP_TRANSFORMER_CLS_TO_WRAP"] in Qwen3PreTrainedModel._no_split_modules


@pytest.mark.parametrize("name, stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_deepspeed_configs_leave_batch_precision_and_clipping_to_the_trainer(name, stage):
    config = json.loads((CONFIGS / name).read_text(encoding="utf-8"))
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", f"{name}: {key} must be 'auto' so the Trainer's flags decide it"
    assert config["fp16"]["enabled"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's --optim and --lr_scheduler_type apply
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
