"""Tool calls: the kit's one form for them in records, parsed back out of generated text, and compared.

    record ``tool_calls`` (OpenAI/HF style, arguments a JSON string or an object) ──normalize_tool_call──▶
        {"type": "function", "function": {"name", "arguments": {...}}}  (what the chat template renders)
    generated text ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` ──parse_tool_calls──▶
        [{"name", "arguments"}] and the text around the blocks

Qwen2.5's template writes ``arguments | tojson`` (a string argument would come out quoted twice) and Qwen3's
writes a string as it is, so arguments are always parsed to an object first: both forms give the same tokens.
"""

from __future__ import annotations

import json
import re

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)  # Qwen's hermes-style blocks


def parse_arguments(arguments) -> dict:
    """A tool call's arguments as an object: a dict as is, a JSON string parsed; ValueError saying why otherwise."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"'arguments' is not valid JSON ({error.msg} at column {error.colno}): {arguments!r:.60}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"'arguments' must be a JSON object (or a string holding one), found {type(arguments).__name__}: {arguments!r:.60}")
    return arguments


def normalize_tool_call(call) -> dict:
    """One call as ``{"type": "function", "function": {"name", "arguments": dict}}``; accepts the bare ``{"name", "arguments"}`` too."""
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be an object, found {type(call).__name__}: {call!r:.60}")
    function = call.get("function", call) if call.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise ValueError(f'a tool call needs {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}, found {call!r:.80}')
    return {"type": "function", "function": {"name": function["name"], "arguments": parse_arguments(function.get("arguments", {}))}}


def normalize_tools(tools, bare_specs: bool = False) -> list[dict]:
    """A record's ``tools``: a list of ``{"type": "function", "function": {"name", ...}}`` (a JSON string of one is parsed).

    Checked shallowly (type and name): the schema itself is the user's. ``bare_specs`` (ShareGPT/LLaMA-Factory
    files) also accepts ``{"name", "description", "parameters"}`` and wraps it as OpenAI does.
    """
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(f"'tools' is a string but not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(tools, list):
        raise ValueError(f"'tools' must be a list of function specs, found {type(tools).__name__}")
    result = []
    for position, tool in enumerate(tools):
        if bare_specs and isinstance(tool, dict) and "type" not in tool and isinstance(tool.get("name"), str):
            tool = {"type": "function", "function": tool}
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise ValueError(f'tools[{position}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}, found {tool!r:.80}')
        result.append(tool)
    return result


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """The text without its well-formed ``<tool_call>`` blocks, and those blocks as ``[{"name", "arguments"}]``.

    A block whose JSON does not parse, or lacks a name or object arguments, stays in the text: a malformed
    call is shown to the user as the model wrote it, never dropped and never a crash.
    """
    calls, kept, last = [], [], 0
    for match in TOOL_CALL_BLOCK.finditer(text):
        try:
            call = json.loads(match[1])
            parsed = {"name": call["name"], "arguments": parse_arguments(call.get("arguments", {}))}
        except (ValueError, TypeError, KeyError):
            continue
        if not isinstance(parsed["name"], str):
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(parsed)
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def reference_tool_calls(record: dict) -> list[dict]:
    """A record's answer's tool calls as ``[{"name", "arguments"}]`` (empty when it answers in text)."""
    return [{"name": call["function"]["name"], "arguments": call["function"]["arguments"]} for call in record.get("tool_calls") or []]


def tool_calls_match(predicted: list[dict], reference: list[dict]) -> bool:
    """True when the calls are the same, in order: names equal and arguments equal as parsed JSON (key order ignored)."""
    return [(call["name"], call["arguments"]) for call in predicted] == [(call["name"], call["arguments"]) for call in reference]
