"""How training examples become batches: padding-free rows, token-budget batches, and the Trainer that uses them.

    padded:        [a a a a . .]      padding-free: [a a a a b b c c c]      token budget: as many examples
                   [b b . . . .]      position_ids   0 1 2 3 0 1 0 1 2       per step as fit in N tokens,
                   [c c c . . .]      (restart = new example)                bucketed by length

Padding-free uses transformers' ``DataCollatorWithFlattening``: the examples of a batch are concatenated
into one row, ``position_ids`` restart at 0 for each example and the first label of each example is -100,
so no token is trained to predict the next example. With no ``attention_mask`` in the batch and no
KV cache (``Trainer`` sets ``config.use_cache = TrainingArguments.use_cache``, False by default),
transformers 5's ``masking_utils.find_packed_sequence_indices`` reads the restarts in ``position_ids``
and builds a block-diagonal causal mask (sdpa, eager, flex), and flash-attention uses them as
variable-length boundaries, so no token attends across examples. With a cache (a model in its
default ``use_cache=True`` config called outside ``Trainer``) the packing is ignored and examples
DO attend to each other; KitTrainer refuses --use_cache True with padding-free batches. The loss covers the same tokens as
the padded batch, so it is the same number (tests/test_batching.py checks both).
"""

from __future__ import annotations

import logging
import random
from typing import Iterator

from ..common.errors import FlagError
from ..common.families import family_of

logger = logging.getLogger("qwen_helpers")

# Attention implementations whose transformers 5 masks separate packed examples from position_ids alone.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")
IGNORE_INDEX = -100


def padding_free_problem(method: str, attn_implementation: str | None, model_type: str | None = None) -> str | None:
    """Why padding-free batches cannot be used for this method, attention kernel and model type, or None when they can."""
    # a name, not the registry's Method.prepends_virtual_tokens: the quick flag check calls this before transformers
    # (run/methods.py imports the argument dataclasses)
    if method == "prompt_tuning":
        return "prompt tuning prepends its virtual tokens to every row, so examples concatenated into one row would share one soft prompt"
    family = family_of(model_type)
    if family is not None and not family.packing_exact:
        return (f"{family.label} ({model_type}) has linear-attention (Gated DeltaNet) layers whose state runs along the row, "
                "so concatenated examples would leak into each other; padded batches are exact")
    if attn_implementation and attn_implementation not in PACKED_ATTENTION:
        return f"attention implementation {attn_implementation!r} is not one whose mask transformers builds from position_ids ({', '.join(PACKED_ATTENTION[:4])})"
    return None


def resolve_padding_free(requested: bool | None, method: str, attn_implementation: str | None,
                         model_type: str | None = None) -> tuple[bool, str]:
    """Decide padding-free batching: on by default where it is exact; an explicit True that is not exact is an error."""
    problem = padding_free_problem(method, attn_implementation, model_type)
    if requested is True and problem:
        raise FlagError(f"--padding_free True: {problem}. Use --padding_free False.")
    if requested is False:
        return False, "batches: padded to the longest example (--padding_free False)"
    if problem:
        return False, f"batches: padded to the longest example (padding-free is off: {problem})"
    return True, "batches: padding-free (examples concatenated, position_ids restart per example; --padding_free False to pad)"


def make_padding_free_collator(attn_implementation: str | None = "sdpa"):
    """``DataCollatorWithFlattening``: one row per batch, position_ids restarting per example, -100 at each boundary."""
    from transformers import DataCollatorWithFlattening

    flash = bool(attn_implementation) and "flash" in attn_implementation
    # flash-attention takes the boundaries directly (cu_seq_lens) instead of deriving them from position_ids
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=flash)


def make_training_collator(tokenizer, padding_free: bool, attn_implementation: str | None = "sdpa"):
    """The training collator: padding-free rows, or dynamic padding to the longest example of the batch."""
    if padding_free:
        return make_padding_free_collator(attn_implementation)
    from ..data.encoding import make_collator

    return make_collator(tokenizer)


def examples_in_batch(batch) -> int:
    """How many examples a collated batch holds: rows when padded, position restarts when flattened into one row."""
    if "attention_mask" not in batch and "position_ids" in batch:
        return int((batch["position_ids"] == 0).sum())
    return int(batch["input_ids"].shape[0])


def real_tokens_in_batch(batch) -> int:
    """Tokens that are not padding: the attention mask's sum, or every token of a padding-free row."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def batch_cost(lengths: list[int], padding_free: bool) -> int:
    """Tokens a batch of these example lengths computes on: their sum padding-free, else rows x the longest."""
    return sum(lengths) if padding_free else len(lengths) * max(lengths)


class TokenBudgetBatchSampler:
    """Batches of as many examples as fit in ``token_budget`` tokens, examples of similar length together.

    Examples are ordered by length (ties broken by a seeded shuffle) and cut greedily into batches whose
    cost (``batch_cost``) stays within the budget, so each step does similar work and padded batches
    waste little. The batches are formed once, so their number is fixed for ``len()`` and the learning
    rate schedule; each epoch shuffles their order with ``seed + epoch``. An example longer than the
    budget gets a batch of its own (it is never dropped). Under DDP, ``accelerate`` (``BatchSamplerShard``,
    even_batches) hands each rank every world_size-th batch of the epoch's order, so each rank works to its
    own budget per step and the ranks see disjoint examples; when the batch count is not a multiple of
    world_size, the ranks left short repeat the epoch's first batches, so every rank takes the same number
    of steps and none waits forever in the gradient all-reduce (tests/test_distributed.py checks this).
    """

    def __init__(self, lengths: list[int], token_budget: int, padding_free: bool, seed: int = 42, shuffle: bool = True):
        if token_budget < 1:
            raise ValueError(f"--token_budget must be at least 1 token, got {token_budget}.")
        self.token_budget, self.padding_free, self.seed, self.shuffle = token_budget, padding_free, seed, shuffle
        self.epoch = 0
        self.batches = self._form_batches(list(lengths))
        self.batch_size = None  # variable: tells accelerate's BatchSamplerShard not to expect equal sizes
        self.oversized = sum(1 for batch in self.batches if len(batch) == 1 and lengths[batch[0]] > token_budget)

    def _form_batches(self, lengths: list[int]) -> list[list[int]]:
        order = list(range(len(lengths)))
        random.Random(self.seed).shuffle(order)  # ties in length are broken at random, reproducibly
        order.sort(key=lambda index: lengths[index])  # stable: the shuffle survives within one length
        batches, current = [], []
        for index in order:
            candidate = current + [index]
            if current and batch_cost([lengths[i] for i in candidate], self.padding_free) > self.token_budget:
                batches.append(current)
                candidate = [index]
            current = candidate
        return batches + ([current] if current else [])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        for position in order:
            yield list(self.batches[position])

    def __len__(self) -> int:
        return len(self.batches)

    def describe(self) -> str:
        sizes = [len(batch) for batch in self.batches]
        line = (f"batches: token budget {self.token_budget} ({'padding-free' if self.padding_free else 'padded'} tokens): "
                f"{len(sizes)} batches of {min(sizes)}-{max(sizes)} examples (mean {sum(sizes) / len(sizes):.1f})")
        if self.oversized:
            line += f"; {self.oversized} example(s) longer than the budget train alone"
        return line


def example_lengths(dataset) -> list[int]:
    """Token length of every example of a tokenised ``datasets.Dataset``."""
    return [len(ids) for ids in dataset["input_ids"]]


def only_trained_logits(inputs: dict) -> dict:
    """Ask the model for logits only where the loss reads them: positions whose next token is trained.

    Prompt tokens never enter the loss (label -100), yet by default the model projects every position
    onto the 151,936-word vocabulary, the largest matmul and the largest activation of a small Qwen.
    transformers' own ``logits_to_keep`` (a boolean mask; modeling_utils.slice_logits_to_keep) keeps
    just the trained positions, and ``shift_labels`` hands the loss their targets already shifted, so
    the loss is the same number over the same tokens (tests/test_batching.py checks it).
    """
    import torch.nn.functional as F

    targets = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    return {**inputs, "logits_to_keep": keep, "shift_labels": targets[keep]}


def kit_trainer_class():
    """The kit's ``Trainer`` subclass (built on first use, so importing this module stays light)."""
    global _KIT_TRAINER
    if _KIT_TRAINER is None:
        _KIT_TRAINER = _build_kit_trainer()
    return _KIT_TRAINER


_KIT_TRAINER = None


def _build_kit_trainer():
    from torch.utils.data import DataLoader
    from transformers import Trainer

    class KitTrainer(Trainer):
        """``Trainer`` that can batch by a token budget, and logs the examples each optimiser step held.

        Everything else (gradient accumulation, loss normalisation over accumulated tokens, DDP, mixed
        precision, checkpoints) is the ``Trainer``'s own.
        """

        def __init__(
            self,
            *args,
            token_budget: int | None = None,
            padding_free: bool = False,
            trained_logits_only: bool = False,
            held_out_scorer=None,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.token_budget, self.padding_free, self.trained_logits_only = token_budget, padding_free, trained_logits_only
            self.held_out_scorer = held_out_scorer  # the task's metric at each evaluation (qwen_helpers.evaluation.held_out)
            if padding_free and self.args.use_cache:
                # masking_utils only reads packed examples from position_ids when no cache is passed
                raise ValueError("--use_cache True cannot train padding-free batches (the attention mask would then span examples); "
                                 "drop --use_cache or pass --padding_free False.")
            self._examples_since_log, self._counting_since_step = 0, 0
            self.budget_sampler = None
            if token_budget:
                self.budget_sampler = TokenBudgetBatchSampler(
                    example_lengths(self.train_dataset), token_budget, padding_free, seed=self.args.data_seed or self.args.seed)

        def get_train_dataloader(self):
            if self.budget_sampler is None:
                return super().get_train_dataloader()
            dataset = self._remove_unused_columns(self.train_dataset, description="Training")
            loader = DataLoader(dataset, batch_sampler=self.budget_sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)  # DDP: each rank takes every world_size-th batch

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.trained_logits_only and not return_outputs and "labels" in inputs:
                inputs = only_trained_logits(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            # Eval loss alone needs logits only where the loss reads them, as in training (~4x cheaper on a small Qwen)
            if not (self.trained_logits_only and prediction_loss_only and "labels" in inputs):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            import torch

            inputs = self._prepare_inputs(inputs)
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)  # as the Trainer's eval step
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return loss.detach().mean(), None, None

        def evaluation_loop(
            self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
        ):
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            if self.held_out_scorer is not None:  # before the Trainer logs these metrics and picks the best from them
                output.metrics.update(self.held_out_scorer(self.model, self.state.global_step, metric_key_prefix))
            return output

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._examples_since_log == 0:  # the first micro-batch counted: since this step (a resumed run starts late)
                self._counting_since_step = self.state.global_step
            self._examples_since_log += examples_in_batch(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

        def log(self, logs, start_time=None):
            steps = self.state.global_step - self._counting_since_step
            if "loss" in logs and steps > 0:  # training logs only; per process (each rank has its own budget)
                logs["examples_per_step"] = self._examples_since_log / steps
                self._examples_since_log = 0
            super().log(logs, start_time)

    return KitTrainer


def check_token_budget(token_budget: int | None, max_length: int) -> None:
    """Refuse a budget too small for any chat example, before anything loads (longer examples than the budget train alone)."""
    if token_budget is not None and token_budget < 16:
        raise FlagError(
            f"--token_budget {token_budget} is too small for a chat-formatted example; use at least {max_length} "
            f"(--max_length) so the longest examples share their steps, e.g. {max_length * 8}."
        )
