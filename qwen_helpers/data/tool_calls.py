"""Tool calls: the kit's one form for them in records, parsed back out of generated text, and compared.

    record ``tool_calls`` (OpenAI/HF style, arguments a JSON string or an object) ──normalize_tool_call──▶
        {"type": "function", "function": {"name", "arguments": {...}}}  (what the chat template renders)
    generated text, either form of block ──parse_tool_calls──▶ [{"name", "arguments"}] and the text around the blocks
        JSON (Qwen2.5, Qwen3)      ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
        XML (Qwen3.5 and later)    ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``

Qwen2.5's template writes ``arguments | tojson`` (a string argument would come out quoted twice) and Qwen3's
writes a string as it is, so arguments are always parsed to an object first: both forms give the same tokens.
Qwen3.5's writes each argument as a ``<parameter=...>`` block; :func:`parse_parameter_value` reads its value back.
"""

from __future__ import annotations

import json
import re
from typing import NoReturn

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)  # Qwen's blocks, either form
XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*)</function>", re.DOTALL)  # a whole block's content (fullmatch)
XML_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)  # the template's newlines are optional
PYTHON_CONSTANTS = {"True": True, "False": False, "None": None}  # what ``value | string`` writes for JSON true, false, null


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


def refuse_constant(name: str) -> NoReturn:
    """``json.loads``'s hook for ``NaN`` and ``Infinity``: the template writes a non-finite float as ``nan``/``inf``."""
    raise ValueError(f"{name} is not JSON")


def parse_parameter_value(value: str) -> object:
    """An XML ``<parameter>`` value as the argument Qwen3.5's template wrote it from (its newlines already taken off).

    The template writes an object or a list as ``tojson``, a number or a bool or null as Python's ``str``
    (``3``, ``0.5``, ``1e+20``, ``True``, ``False``, ``None``) and a string as it is. So ``True``/``False``/``None``
    read back as those values, and a value that is exactly a JSON number, object or list reads back as one;
    anything else (``true``, ``"quoted"``, ``007``, ``NaN``, a number with spaces around it) stays a string, as
    written. The text cannot tell a string argument ``"3"``, ``"[1]"`` or ``"True"`` from the number, list or bool
    the template writes the same way: it reads back as the number, list or bool.
    """
    if value in PYTHON_CONSTANTS:
        return PYTHON_CONSTANTS[value]
    if value != value.strip():  # json.loads would skip the spaces a string argument kept
        return value
    try:
        parsed = json.loads(value, parse_constant=refuse_constant)
    except ValueError:
        return value
    return parsed if isinstance(parsed, (int, float, dict, list)) and not isinstance(parsed, bool) else value


def parse_xml_call(content: str) -> dict:
    """One XML block's content as ``{"name", "arguments"}``; ValueError when a part is missing or left open."""
    function = XML_FUNCTION.fullmatch(content)
    if function is None:
        raise ValueError("no <function=NAME>...</function>")
    body, position, arguments = function[2], 0, {}
    while parameter := XML_PARAMETER.match(body, position):
        if "<parameter=" in parameter[2]:
            raise ValueError(f"parameter {parameter[1]!r} is not closed")
        arguments[parameter[1]] = parse_parameter_value(parameter[2])
        position = parameter.end()
    if body[position:].strip():
        raise ValueError(f"not a closed <parameter=...> block: {body[position:]!r:.40}")
    return {"name": function[1], "arguments": arguments}


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """The text without its well-formed ``<tool_call>`` blocks, and those blocks as ``[{"name", "arguments"}]``.

    A block starting ``<function=`` is read as XML (:func:`parse_xml_call`), any other as JSON. A block whose
    JSON does not parse or lacks a name or object arguments, or whose XML has no ``<function=NAME>`` or an
    unclosed part, stays in the text: a malformed call is shown to the user as the model wrote it, never
    dropped and never a crash.
    """
    calls, kept, last = [], [], 0
    for match in TOOL_CALL_BLOCK.finditer(text):
        try:
            if match[1].startswith("<function="):
                parsed = parse_xml_call(match[1])
            else:
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
