"""Reinforcement learning with verifiable rewards: GRPO (TRL's GRPOTrainer) on a LoRA adapter.

    python -m qwen_helpers.train_grpo --model_path tiny --data_path data/grpo_toy.json \
        --reward language --output_dir outputs/grpo

``--reward exact_match,format`` scores each sampled completion with functions of :mod:`qwen_helpers.training.rewards`.
Every TrainingArguments and GRPOConfig flag works too (``--num_generations``, ``--max_completion_length``, ``--beta``).
"""

import sys

from .common.errors import command_boundary
from .run.flag_checks import refuse_data_format_flag
from .run.quickflags import dataclass_parser, parse_command_flags


def parse_grpo_args(argv=None):
    """(model, data, LoRA, GRPO config) arguments; a bad flag or reward name: one line, before loading."""

    def build_parser():
        from .run.config import LoraArguments, ModelArguments
        from .training.grpo import KitGRPOConfig, PromptDataArguments

        return dataclass_parser(ModelArguments, PromptDataArguments, LoraArguments, KitGRPOConfig)

    refuse_data_format_flag(argv, "train_grpo", "prompt records")
    return parse_command_flags("train_grpo", build_parser, argv)  # the reward names and base: before loading


@command_boundary  # a user error is one line on stderr and exit code 2 (--debug shows the traceback)
def main(argv=None) -> int:
    model_args, data_args, lora_args, config = parse_grpo_args(argv)

    from .notebook.plots import plot_rewards
    from .training.dpo import finish_command
    from .training.grpo import reward_summary, train_grpo

    result = train_grpo(model_args, data_args, lora_args, config)
    return finish_command(result, "grpo", f"GRPO on {model_args.model_path}", plot_rewards, reward_summary)


if __name__ == "__main__":
    sys.exit(main())
