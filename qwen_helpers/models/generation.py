"""Generate with a loaded model: chat-formatted prompts, left-padded batches, stop at ``<|im_end|>``, a soft prompt once.

Prompts are rendered and tokenised by :func:`qwen_helpers.data.encoding.tokenize_prompt`, exactly as training does
(same template options such as Qwen3's ``enable_thinking``; special-token text in a record stays text);
generation stops at ``<|im_end|>`` (the end of an assistant turn) and batches are left-padded, so
the last prompt token of every row sits next to its first new token.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import torch

from ..data.encoding import tokenize_prompt
from ..data.records import split_reasoning
from .loading import synchronize
from ..data.tool_calls import parse_tool_calls

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end of an assistant turn; end of a document (base models)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: ``<|im_end|>`` first, then ``<|endoftext|>``."""
    return [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]


def cut_at_stop(token_ids: list[int], stop_ids: list[int]) -> list[int]:
    """The new tokens up to and including the first stop token (padding after it removed)."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: position + 1]
    return token_ids


def uses_soft_prompt(model) -> bool:
    """True for a peft model whose active adapter is a soft prompt put in front of the input embeddings (prompt tuning, p-tuning)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or getattr(model, "_adapters_disabled", False):  # inside disable_adapter() the base runs alone
        return False
    return str(config.peft_type.value) in ("PROMPT_TUNING", "P_TUNING")


@torch.no_grad()
def generate_new_tokens(model, batch, **generate_kwargs):
    """``model.generate`` on a tokenised batch, keeping only the new tokens (in ``.sequences`` with ``return_dict_in_generate``).

    A soft prompt is prepended once, as input embeddings, and the base generates from them: peft 0.21's own
    ``generate`` looks for ``past_key_values``, which transformers 5 calls ``cache``, so it re-inserts the
    virtual tokens at every step and every token after the first comes from a corrupted cache.
    """
    if uses_soft_prompt(model):
        word_embeddings = model.get_input_embeddings()(batch["input_ids"])
        soft_prompt = model.get_prompt(batch_size=word_embeddings.shape[0]).to(word_embeddings.dtype)
        prompt_mask = batch["attention_mask"].new_ones(soft_prompt.shape[:2])
        return model.get_base_model().generate(
            inputs_embeds=torch.cat([soft_prompt, word_embeddings], dim=1),
            attention_mask=torch.cat([prompt_mask, batch["attention_mask"]], dim=1),
            **generate_kwargs,
        )  # generating from embeddings, transformers returns only the new tokens
    output = model.generate(**batch, **generate_kwargs)
    prompt_length = batch["input_ids"].shape[1]
    if generate_kwargs.get("return_dict_in_generate"):
        output.sequences = output.sequences[:, prompt_length:]
        return output
    return output[:, prompt_length:]


@torch.no_grad()
def token_logprobs(model, token_ids: list[int], start: int = 1) -> torch.Tensor:
    """The model's fp32 log-probabilities at the positions that predict ``token_ids[start:]`` (rows: those tokens,
    columns: the vocabulary), from one forward pass over ``token_ids`` in the model's current mode."""
    ids = torch.tensor([token_ids], device=model.device)
    return model(input_ids=ids).logits[0, start - 1 : -1].float().log_softmax(-1)


def prompt_batch(tokenizer, records: list[dict], enable_thinking: bool = False):
    """The records' prompts as one left-padded batch of ids, tokenised exactly as training tokenises them."""
    ids = [tokenize_prompt(tokenizer, record, enable_thinking) for record in records]
    return tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")


@torch.no_grad()
def generate_ids(model, tokenizer, records: list[dict], max_new_tokens: int = 64, enable_thinking: bool = False, **generate_kwargs) -> list[list[int]]:
    """New token ids for one left-padded batch of records, each cut after its first stop token; greedy by default."""
    batch = prompt_batch(tokenizer, records, enable_thinking).to(model.device)
    generate_kwargs.setdefault("do_sample", False)
    output = generate_new_tokens(
        model, batch, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **generate_kwargs
    )
    stops = stop_token_ids(tokenizer)
    return [cut_at_stop(row, stops) for row in output.tolist()]


def generate_timed(model, tokenizer, records: list[dict], max_new_tokens: int = 64, batch_size: int = 8, progress: bool = False,
                   enable_thinking: bool = False, **generate_kwargs) -> list[dict]:
    """Answer every record in batches; per record: prediction, tool calls, new tokens (EOS included) and its batch's time.

    ``prediction`` is the answer's text; well-formed ``<tool_call>`` blocks are parsed out of it into
    ``tool_calls`` (``[{"name", "arguments"}]``, empty without any); a malformed block stays in the text.
    """
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(records), desc="generating", unit="record", disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            synchronize()
            began = time.perf_counter()
            rows = generate_ids(model, tokenizer, chunk, max_new_tokens, enable_thinking, **generate_kwargs)
            synchronize()
            seconds = time.perf_counter() - began
            for ids in rows:
                reasoning, text = split_reasoning(tokenizer.decode(ids, skip_special_tokens=True).strip())  # Qwen3 think block -> its own field
                text, calls = parse_tool_calls(text)
                results.append({"prediction": text, "tool_calls": calls, "new_tokens": len(ids), "batch_seconds": round(seconds, 4), "batch_size": len(chunk),
                                **({"reasoning": reasoning} if reasoning is not None else {})})
            bar.update(len(chunk))
    return results


def total_seconds(rows: list[dict]) -> float:
    """Wall time of a :func:`generate_timed` run: each batch counted once (its records all carry its time)."""
    seconds, index = 0.0, 0
    while index < len(rows):
        seconds += rows[index]["batch_seconds"]
        index += rows[index]["batch_size"]
    return seconds


def generate(model, tokenizer, records: list[dict], max_new_tokens: int = 64, batch_size: int = 8, **generate_kwargs) -> list[str]:
    """Answer each record (instruction/input) with the model: left-padded batches, stop at ``<|im_end|>``, greedy by default."""
    return [row["prediction"] for row in generate_timed(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs)]


def generate_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 64, batch_size: int = 8, **generate_kwargs) -> list[dict]:
    """Answer each record: ``{"text", "tool_calls"}``, the calls parsed from Qwen's ``<tool_call>`` blocks (the record's ``tools`` are in the prompt)."""
    rows = generate_timed(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs)
    return [{"text": row["prediction"], "tool_calls": row["tool_calls"]} for row in rows]


def stream(model, tokenizer, record: dict, max_new_tokens: int = 64, enable_thinking: bool = False, **generate_kwargs) -> Iterator[str]:
    """Yield the answer to one record piece by piece as it is generated (``TextIteratorStreamer`` + a thread)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = prompt_batch(tokenizer, [record], enable_thinking).to(model.device)
    generate_kwargs.setdefault("do_sample", False)
    errors = []

    def run():
        try:
            generate_new_tokens(model, inputs, streamer=streamer, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        except Exception as error:  # re-raised below, in the caller's thread
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
