"""The plain transformers + peft reference: what a user writes without this kit, run on the same data and settings.

``AutoModelForCausalLM.from_pretrained``, a peft config (``LoraConfig``, ``PromptTuningConfig``, or
``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training`` for QLoRA), ``Trainer`` with the same
``TrainingArguments`` and ``DataCollatorForSeq2Seq`` padding (to the longest example, or to
``--seq_len`` for the pad-to-max row). The examples are the kit's tokenisation of the same file, so
both sides train on identical tokens; only the path that trains them differs. The same ``StepTimer``
times both, and the CPU allocator setting is applied to both or neither.
"""

from __future__ import annotations


def load_plain_base(spec: dict):
    """The base model as a plain script loads it: ``from_pretrained`` in the row's precision, or NF4 for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    method, precision = spec["method_spec"], spec["precision"]
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if method["load_in_4bit"]:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute)
        return AutoModelForCausalLM.from_pretrained(spec["model_path"], quantization_config=quantization, dtype=compute,
                                                    device_map={"": device})
    dtype = torch.float32 if method["fp32_master_weights"] else compute
    return AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=dtype).to(device)


def plain_peft_config(spec: dict):
    """The row's peft config as a plain script writes it (LoRA and its variants, or prompt tuning; None for full FT)."""
    from peft import LoraConfig, PromptTuningConfig, TaskType

    args, method = spec["args"], spec["method_spec"]
    if method["adapts_linear_layers"]:
        targets = args["target_modules"] if args["target_modules"] == "all-linear" else args["target_modules"].split(",")
        options = dict(method["lora_options"])  # a variant as a plain script writes it (LoRA+: its optimiser, below)
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=args["lora_r"], lora_alpha=32, lora_dropout=0.05,
                          target_modules=targets, use_dora=options.get("use_dora", False),
                          use_rslora=options.get("use_rslora", False),
                          init_lora_weights=options.get("init_lora_weights", True))
    if method["prepends_virtual_tokens"]:
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args["num_virtual_tokens"])
    return None


def load_plain_model(spec: dict):
    """The model as a plain script loads it, with the method's peft wrapper."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_plain_base(spec)
    if spec["method_spec"]["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"])
    config = plain_peft_config(spec)
    return get_peft_model(model, config) if config is not None else model


def loraplus_optimizer(model, spec: dict, learning_rate: float):
    """LoRA+'s optimiser (peft's ``create_loraplus_optimizer``) for a LoRA+ row, else None (the Trainer's own AdamW)."""
    ratio = dict(spec["method_spec"]["lora_options"]).get("loraplus_lr_ratio")
    if not ratio:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=learning_rate, loraplus_lr_ratio=ratio)


def run_plain(spec: dict) -> dict:
    """Train the reference for warm-up + timed steps and return its row (same timer and figures as the kit's)."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from ..data.encoding import IGNORE_INDEX
    from ..data.loading import load_dataset_for_training
    from ..training.allocator import tune_cpu_allocator
    from ..models.loading import count_parameters
    from .measure import finish, rss_bytes, step_timer, training_arguments

    args = spec["args"]
    rss_start = rss_bytes()
    if spec["cpu_allocator_tuning"] and spec["device"] == "cpu":
        tune_cpu_allocator()  # the same setting as the kit's side, so it cannot explain a difference
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    dataset = load_dataset_for_training(tokenizer, spec["data_path"], args["seq_len"], "truncate_prompt").dataset
    set_seed(0)
    model = load_plain_model(spec)
    padding = {"pad_max": "max_length"}.get(spec["batching"], "longest")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=padding, max_length=args["seq_len"] if padding == "max_length" else None,
                                      label_pad_token_id=IGNORE_INDEX)
    timer = step_timer(args["warmup_steps"], count_trained_tokens=True)
    training_args = TrainingArguments(**training_arguments(spec, logging_steps=1, use_cpu=spec["device"] == "cpu"))
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer,
                      callbacks=[timer], optimizers=(loraplus_optimizer(model, spec, training_args.learning_rate), None))
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    return finish({"examples_per_step": float(args["batch_size"])}, timer, losses, count_parameters(model), rss_start)
