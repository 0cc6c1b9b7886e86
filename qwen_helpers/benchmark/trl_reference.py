"""The TRL reference: the SFT step as a TRL user writes it, on the same records and settings as the kit's row.

``SFTTrainer(model=..., args=SFTConfig(...), train_dataset=..., peft_config=...)`` with the plain reference's
model loading and peft config (plain.py: the same LoRA rank, alpha, targets and dropout, or NF4 for QLoRA), the
same ``TrainingArguments`` (steps, batch, precision, seed, optimiser, checkpointing) and the same ``StepTimer``.
TRL's side of it is TRL's own: its tokenisation, its padding-free collator (``padding_free=True``: a batch is one
row with ``position_ids`` restarting at each example, as the kit's default) and its loss (TRL 1.16's fused LM
head: log-probabilities of the trained positions only).

What TRL trains on. ``assistant_only_loss=True`` needs conversational records and a template with ``{% generation %}``
markers; Qwen2.5's has none, so TRL swaps in its ``qwen2_5_training.jinja``, whose marked span also takes the newline
after ``<|im_start|>assistant`` and the one after ``<|im_end|>``: two tokens per answer more than the kit trains
(conversational prompt/completion records train one more: the newline after ``<|im_end|>``). TRL's way to train
exactly the answer is its prompt-completion format with ``completion_only_loss``, which this row uses: the prompt
is the chat template's rendering of the turns before the answer (generation prompt included), the completion is the
answer's text, and TRL appends the tokenizer's eos (``<|im_end|>`` on instruct Qwen checkpoints). So TRL trains the
answer and ``<|im_end|>``, the kit's tokens, and every row reports ``trained_tokens_per_step`` to show it (the
benchmark's records have one answer each; in a multi-turn ``--data`` file TRL trains only the last answer, the kit
every one, and that column shows the difference).
"""

from __future__ import annotations

from .measure import finish, rss_bytes, step_timer, training_arguments


def completion_records(tokenizer, data_path: str) -> list[dict]:
    """TRL's prompt-completion records of a data file: the rendered prompt, and the last answer's text."""
    from ..data.encoding import build_messages
    from ..data.records import load_records

    records = []
    for record in load_records(data_path):
        messages = build_messages(record)
        prompt = tokenizer.apply_chat_template(messages[:-1], tools=record.get("tools"), tokenize=False,
                                               add_generation_prompt=True)
        records.append({"prompt": prompt, "completion": messages[-1]["content"]})
    return records


def trl_sft_config(spec: dict):
    """``SFTConfig``: the shared TrainingArguments, padding-free batches and the loss on completions only."""
    from trl import SFTConfig

    padding_free = not spec["method_spec"]["prepends_virtual_tokens"]  # virtual tokens are prepended per row
    return SFTConfig(**training_arguments(spec, logging_steps=1, use_cpu=spec["device"] == "cpu"),
                     padding_free=padding_free,
                     completion_only_loss=True,
                     max_length=None)  # padding-free needs it (TRL refuses to truncate unpacked rows); every record fits --seq_len


def run_trl_sft(spec: dict) -> dict:
    """Train TRL's SFTTrainer for warm-up + timed steps and return its row (same timer and figures as the kit's)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer, set_seed
    from trl import SFTTrainer

    from ..models.loading import count_parameters
    from ..training.allocator import tune_cpu_allocator
    from .plain import load_plain_base, loraplus_optimizer, plain_peft_config

    rss_start = rss_bytes()
    if spec["cpu_allocator_tuning"] and spec["device"] == "cpu":
        tune_cpu_allocator()  # the same setting as the kit's side, so it cannot explain a difference
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    dataset = Dataset.from_list(completion_records(tokenizer, spec["data_path"]))
    set_seed(0)
    model, peft_config = load_plain_base(spec), plain_peft_config(spec)
    config = trl_sft_config(spec)
    optimizer = None
    if dict(spec["method_spec"]["lora_options"]).get("loraplus_lr_ratio"):  # TRL has no LoRA+: wrap first, as plain does
        model, peft_config = get_peft_model(model, peft_config), None
        optimizer = loraplus_optimizer(model, spec, config.learning_rate)
    timer = step_timer(spec["args"]["warmup_steps"], count_trained_tokens=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer], optimizers=(optimizer, None))
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    row = {"examples_per_step": float(spec["args"]["batch_size"]),
           "notes": [f"TRL SFTTrainer: padding_free={config.padding_free}, completion_only_loss=True, "
                     f"completions end with eos {tokenizer.eos_token}"]}
    return finish(row, timer, losses, count_parameters(trainer.model), rss_start)
