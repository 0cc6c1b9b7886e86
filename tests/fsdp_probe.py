"""Run ``python -m qwen_helpers.train_lora`` unchanged as an FSDP run of CPU processes, recording how each rank was sharded.

    accelerate launch --config_file configs/fsdp2_lora.yaml --num_processes 2 tests/fsdp_probe.py --use_cpu True ...
    (PROBE_DIR=folder for the records; used by tests/test_fsdp.py)

accelerate 1.16 turns an FSDP launch into FSDP only in a world of GPUs (or XPUs, NPUs, ...): ``AcceleratorState``
upgrades a MULTI_GPU world to FSDP when ``ACCELERATE_USE_FSDP`` is set, and leaves a CPU world MULTI_CPU, that
is plain DDP, whatever the config says (the kit refuses that launch; see ``check_distributed_launch``). This probe
makes that one decision for the CPU world as accelerate makes it for GPUs: the gloo world of the launch becomes
FSDP, with the plugin accelerate built from the launch's ``FSDP_*`` variables. Everything else runs as on GPUs:
accelerate's ``fully_shard`` of each decoder layer, the Trainer, the kit's checks, its save on rank 0 and the
publish of the output folder. Each rank appends one JSON line per training step to ``$PROBE_DIR/rank<R>.jsonl``:
the strategy, the FSDP units, and how many of the model's weights that rank holds.
"""

import json
import os
import runpy
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

from qwen_helpers.training.batching import kit_trainer_class


def fsdp_asked() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_cpu_world_fsdp() -> None:
    """MULTI_CPU -> FSDP where accelerate would make MULTI_GPU -> FSDP (state.py, ``AcceleratorState.__init__``)."""
    partial_init, accelerator_init = accelerate.state.PartialState.__init__, accelerate.state.AcceleratorState.__init__

    def partial_state(self, *args, **kwargs):
        partial_init(self, *args, **kwargs)
        if fsdp_asked() and self.distributed_type == DistributedType.MULTI_CPU:
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    def accelerator_state(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.FSDP and getattr(self, "fsdp_plugin", None) is None:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin  # the plugin Accelerator built from the FSDP_* variables

    accelerate.state.PartialState.__init__ = partial_state
    accelerate.state.AcceleratorState.__init__ = accelerator_state


def sharding_note(trainer, model) -> dict:
    """What this rank holds: the strategy, the FSDP units, and its share of the weights (local shard vs whole)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    sharded = [parameter for parameter in parameters if isinstance(parameter, DTensor)]
    state = trainer.accelerator.state
    return {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "distributed_type": state.distributed_type.value,
        "fsdp_version": getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None),
        "fsdp_units": sorted({type(module).__name__ for module in model.modules() if isinstance(module, FSDPModule)}),
        "fsdp_unit_count": sum(isinstance(module, FSDPModule) for module in model.modules()),
        "parameters": len(parameters),
        "sharded_parameters": len(sharded),
        "whole_numel": sum(parameter.numel() for parameter in parameters),
        "local_numel": sum(parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
                           for parameter in parameters),
        "trainable_sharded": sum(parameter.requires_grad for parameter in sharded),
    }


def install(folder: Path) -> None:
    trainer_class = kit_trainer_class()
    original = trainer_class.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        note = {**sharding_note(self, model), "step": self.state.global_step}
        with (folder / f"rank{self.args.process_index}.jsonl").open("a", encoding="utf-8") as file:
            file.write(json.dumps(note) + "\n")
        return original(self, model, inputs, *args, **kwargs)

    trainer_class.training_step = training_step


if __name__ == "__main__":
    make_cpu_world_fsdp()
    install(Path(os.environ["PROBE_DIR"]))
    runpy.run_module("qwen_helpers.train_lora", run_name="__main__", alter_sys=True)
