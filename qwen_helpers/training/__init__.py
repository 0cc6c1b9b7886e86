"""The training path: the Trainer and its callbacks, the run folder, batching and speed options; SFT, DPO and GRPO."""
