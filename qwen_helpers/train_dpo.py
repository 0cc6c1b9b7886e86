"""Preference-tune a LoRA adapter with DPO (TRL's DPOTrainer) on chosen/rejected pairs.

    python -m qwen_helpers.train_dpo --model_path tiny --data_path data/preference.json \
        --eval_data_path data/preference_test.json --output_dir outputs/dpo

``--adapter_path outputs/lora`` starts from an SFT adapter (trained further; a frozen copy is the reference).
Every TrainingArguments and DPOConfig flag works too (``--beta``, ``--loss_type``, ``--load_in_4bit True``).
"""

import sys

from .common.errors import command_boundary
from .run.flag_checks import refuse_data_format_flag
from .run.quickflags import dataclass_parser, parse_command_flags


def parse_dpo_args(argv=None):
    """(model, data, LoRA, DPO config) arguments; flag mistakes are one line before the model loads."""

    def build_parser():
        from .run.config import LoraArguments, ModelArguments
        from .training.dpo import KitDPOConfig, PreferenceDataArguments

        return dataclass_parser(ModelArguments, PreferenceDataArguments, LoraArguments, KitDPOConfig)

    refuse_data_format_flag(argv, "train_dpo", "preference pairs (prompt or messages, chosen, rejected)")
    return parse_command_flags("train_dpo", build_parser, argv)


@command_boundary  # a user error is one line on stderr and exit code 2 (--debug shows the traceback)
def main(argv=None) -> int:
    model_args, data_args, lora_args, config = parse_dpo_args(argv)

    from .notebook.plots import plot_preference
    from .training.dpo import finish_command, preference_summary, train_dpo

    result = train_dpo(model_args, data_args, lora_args, config)
    return finish_command(result, "dpo", f"DPO on {model_args.model_path}", plot_preference, preference_summary)


if __name__ == "__main__":
    sys.exit(main())
