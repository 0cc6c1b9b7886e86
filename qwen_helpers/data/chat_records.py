"""Validate chat records (``messages`` and ShareGPT ``conversations``): roles, turn order, answers, reasoning and tool calls.

    {"messages": [{"role", "content", "tool_calls"?}, ...], "tools"?: [...]}  ──validate_conversation──▶
        the kit's record: ``messages`` (every turn before the answer), ``output`` (the answer's text),
        ``reasoning``, ``tool_calls`` (the answer's calls) and ``tools`` where the record has them

Tool calling follows the OpenAI/HF form the Qwen chat templates render: assistant ``tool_calls``
(``[{"type": "function", "function": {"name", "arguments"}}]``), ``tool`` turns with the results, and a
per-record ``tools`` list of function specs. ShareGPT's ``function_call`` and ``observation`` turns
(LLaMA-Factory's form, with ``tools`` often a JSON string) map onto them. Every problem is one line naming
the file, the record and the turn. :mod:`qwen_helpers.data.records` reads files and validates alpaca records.
"""

from __future__ import annotations

import json
from typing import Any

from ..common.errors import DataValidationError
from .tool_calls import normalize_tool_call, normalize_tools

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
REASONING_FIELDS = ("reasoning_content", "reasoning")  # where records carry an answer's reasoning (Qwen3 thinking mode)
# what may follow each turn: an assistant turn that calls tools is followed by their results, then the assistant again
_NEXT = {None: {"user"}, "user": {"assistant"}, "assistant": {"user"}, "calls": {"tool"}, "tool": {"tool", "assistant"}}


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split ``<think>reasoning</think>answer`` into (reasoning, answer); (None, text) when there is no think block.

    Used on records (an answer that carries its reasoning inline) and on Qwen3 predictions, whose
    reasoning goes to a separate field so metrics compare answers only.
    """
    stripped = text.lstrip()
    if not stripped.startswith("<think>") or "</think>" not in stripped:
        return None, text
    reasoning, _, answer = stripped[len("<think>"):].partition("</think>")
    return reasoning.strip("\n"), answer.lstrip("\n")


def check_answer(answer: str, at: str, may_be_empty: bool = False) -> None:
    """Refuse an answer empty after its think block, or holding a think tag (Qwen3's template splits at </think>)."""
    if not answer.strip() and not may_be_empty:
        raise DataValidationError(f"{at}: the answer is empty once its <think>…</think> block is split off, so "
                                  "there is nothing to learn. Add the answer after </think>, or remove the record.")
    tag = next((tag for tag in ("<think>", "</think>") if tag in answer), None)
    if tag:
        raise DataValidationError(f"{at}: the answer holds {tag} after its start; Qwen3's chat template would turn "
                                  "the text before </think> into a reasoning block. Put the reasoning in one leading "
                                  "<think>…</think> block or a 'reasoning_content' field, or remove the tag.")


def validate_conversation(record: Any, index: int, where: str, file_format: str) -> dict:
    """Check one messages/ShareGPT record and split it into the turns before the answer and the answer."""
    key, role_key, text_key = ("messages", "role", "content") if file_format == "messages" else ("conversations", "from", "value")
    at = f"{where}, record {index}"
    if not isinstance(record, dict):
        raise DataValidationError(f"{at}: expected an object, found {type(record).__name__}: {record!r:.80}.")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataValidationError(
            f"{at}: expected a non-empty list under '{key}' ({file_format} format). Found fields {sorted(record)}; "
            f"pass --data_format alpaca|messages|sharegpt if the file is in another format."
        )
    if file_format == "messages" and isinstance(record.get("output"), str) and turns[-1].get("role") != "assistant":
        # the kit's own form (load_records' output written back to a file): the turns before the answer, then "output"
        answer = {"role": "assistant", "content": record["output"], "reasoning_content": record.get("reasoning"),
                  "tool_calls": record.get("tool_calls")}
        turns = [*turns, {key: value for key, value in answer.items() if value is not None}]
    messages = [_turn(turn, f"{at}, turn {position}", file_format, role_key, text_key) for position, turn in enumerate(turns)]
    _check_turn_order(messages, at)
    *history, answer = messages
    dropped = (key, "instruction", "input", "output", "reasoning", "tools", "tool_calls")
    extra = {name: value for name, value in record.items() if name not in dropped}
    last_user = next(message["content"] for message in reversed(history) if message["role"] == "user")
    result = {**extra, "messages": history, "instruction": last_user, "input": "", "output": answer["content"]}
    if answer.get("reasoning_content"):
        result["reasoning"] = answer["reasoning_content"]
    if answer.get("tool_calls"):
        result["tool_calls"] = answer["tool_calls"]
    if record.get("tools") not in (None, "", []):
        try:
            result["tools"] = normalize_tools(record["tools"], bare_specs=file_format == "sharegpt")
        except ValueError as error:
            raise DataValidationError(f"{at}, field 'tools': {error}. Fix the record's function specs.") from None
    return result


def _turn(turn: Any, at: str, file_format: str, role_key: str, text_key: str) -> dict:
    """One turn in the kit's form: role, content, and an assistant's reasoning_content and tool_calls."""
    calls_key = "tool_calls" if file_format == "messages" else None
    if not isinstance(turn, dict) or role_key not in turn or (text_key not in turn and not turn.get(calls_key)):
        raise DataValidationError(f"{at}: expected an object with '{role_key}' and '{text_key}', found {turn!r:.80}.")
    role = turn[role_key] if file_format == "messages" else SHAREGPT_ROLES.get(turn[role_key], turn[role_key])
    if role not in ROLES:
        allowed = ROLES if file_format == "messages" else sorted(SHAREGPT_ROLES)
        raise DataValidationError(f"{at}: unknown role {turn[role_key]!r}; the roles this kit trains on are {', '.join(allowed)}.")
    if calls_key and role != "assistant" and turn.get(calls_key):  # null or [] carry nothing; calls would vanish unrendered
        raise DataValidationError(f"{at}: a {role} turn has 'tool_calls', but only the assistant calls tools (the templates "
                                  "render calls on assistant turns only). Move the calls to the assistant turn that makes them, or remove the field.")
    calls = turn.get(calls_key) if role == "assistant" and calls_key else None
    if file_format == "sharegpt" and turn[role_key] == "function_call":  # LLaMA-Factory: the value is the call(s) as JSON
        calls, turn = _sharegpt_calls(turn[text_key], at), {**turn, text_key: ""}
    content = turn.get(text_key) if turn.get(text_key) is not None or not calls else ""
    if not isinstance(content, str):
        raise DataValidationError(f"{at}: '{text_key}' must be a string, found {type(content).__name__}.")
    message = {"role": role, "content": content}
    if role != "assistant":
        return message
    reasoning = next((turn[name] for name in REASONING_FIELDS if isinstance(turn.get(name), str) and turn[name]), None)
    if reasoning is None:
        reasoning, message["content"] = split_reasoning(message["content"])
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls is not None:
        message["tool_calls"] = _tool_calls(calls, at)
    if not message["content"].strip() and not calls:
        raise DataValidationError(f"{at}: the assistant turn is empty, so there is nothing to learn. Fill it in or remove it.")
    check_answer(message["content"], at, may_be_empty=bool(calls))
    return message


def _tool_calls(calls: Any, at: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise DataValidationError(f"{at}: 'tool_calls' must be a non-empty list of calls, found {calls!r:.60}.")
    normalized = []
    for number, call in enumerate(calls):
        try:
            normalized.append(normalize_tool_call(call))
        except ValueError as error:
            raise DataValidationError(f"{at}, tool call {number}: {error}. Fix the call (arguments: a JSON object, "
                                      "or a string holding one).") from None
    return normalized


def _sharegpt_calls(value: Any, at: str) -> list:
    """A ShareGPT ``function_call`` value: ``{"name", "arguments"}`` (or a list of them) as JSON text."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise DataValidationError(f"{at}: the function_call value is not valid JSON ({error.msg} at column {error.colno}); "
                                  'write it as {"name": ..., "arguments": {...}}.') from None
    return calls if isinstance(calls, list) else [calls]


def _check_turn_order(messages: list[dict], at: str) -> None:
    """An optional system turn, user and assistant turns alternating (a tool call followed by its results), ending with the assistant."""
    roles = [message["role"] for message in messages]
    body = messages[1:] if roles[0] == "system" else messages
    previous, ok = None, bool(body)
    for message in body:
        ok = ok and message["role"] in _NEXT[previous]
        previous = "calls" if message.get("tool_calls") else message["role"]
    if not ok or previous not in ("assistant", "calls"):
        raise DataValidationError(
            f"{at}: turn order {' -> '.join(roles)} cannot be rendered by a Qwen chat template for training: it must be "
            "an optional system turn, then user and assistant turns alternating (an assistant turn with tool_calls "
            "followed by its tool results, then the assistant again), ending with an assistant turn."
        )
