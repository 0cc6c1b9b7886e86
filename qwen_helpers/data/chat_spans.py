"""Where a chat template puts the data and the trained text: marked renderings, trained spans, per-shape skeletons.

    messages ──render_conversation──▶ the text, where each message's text lies in it (data), which spans are trained
    a conversation shape (roles, reasoning or not) ──skeleton_of──▶ the same, once per shape, with placeholder texts

Every position comes from the template's own renderings; nothing is found by searching for a token.
:mod:`qwen_helpers.data.encoding` tokenises the pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, enable_thinking: bool, tools: list[dict] | None = None) -> str:
    """The checkpoint's own chat template applied to ``messages`` and ``tools`` (``enable_thinking`` is read by Qwen3's, ignored by others)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )


def thinking_default(tokenizer) -> bool | None:
    """The template's own thinking mode when a request does not choose one: True (Qwen3, Qwen3.5-4B and up, Qwen3.6,
    Qwen3.8), False (Qwen3.5-0.8B/2B), None when the template has no switch (Qwen2.5, Qwen3-2507)."""
    messages = [{"role": "user", "content": "x"}]
    on, off = (render(tokenizer, messages, True, mode) for mode in (True, False))
    if on == off:
        return None
    default = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return default == on


# Private-use characters that mark where each message's text sits in the rendered template, so data can be
# told from scaffolding: "\ue000c3\ue002" opens the content of message 3, "\ue001c3\ue002" closes it.
_OPEN, _CLOSE, _END = "\ue000", "\ue001", "\ue002"
_MARK = re.compile(f"([{_OPEN}{_CLOSE}])([cr]\\d+){_END}")


@dataclass
class RenderedConversation:
    """A conversation rendered by its chat template: the text, where the data lies in it, and which spans are trained."""

    text: str
    data_spans: list[tuple[int, int]]  # message contents (tokenised as plain text: special-token text stays text)
    trained_spans: list[tuple[int, int]]  # each assistant turn's content (and reasoning) and its closing token


def _marked(messages: list[dict]) -> list[dict]:
    marked = []
    for position, message in enumerate(messages):
        message = dict(message)
        if message["content"] or not message.get("tool_calls"):  # a call's empty text stays empty: templates test it
            message["content"] = f"{_OPEN}c{position}{_END}{message['content']}{_CLOSE}c{position}{_END}"
        if message.get("reasoning_content"):
            message["reasoning_content"] = f"{_OPEN}r{position}{_END}{message['reasoning_content']}{_CLOSE}r{position}{_END}"
        marked.append(message)
    return marked


_REWRITES = ("The chat template rewrites message contents (it renders them differently once marked), so the kit "
             "cannot tell data from template text. Use a Qwen chat template, or report the template.")


def _unmark(text: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Remove the markers; return the plain text and each marked field's (start, end) in it."""
    plain, spans, opened, last = [], {}, {}, 0
    length = 0
    for match in _MARK.finditer(text):
        piece = text[last:match.start()]
        plain.append(piece)
        length += len(piece)
        kind, tag = match.groups()
        if kind == _OPEN:
            opened[tag] = length
        elif tag in opened:
            spans[tag] = (opened.pop(tag), length)
        else:  # the template cut a text apart (Qwen3 splits answers at </think>): no span to name
            raise ValueError(_REWRITES)
        last = match.end()
    plain.append(text[last:])
    return "".join(plain), spans


def render_conversation(tokenizer, messages: list[dict], enable_thinking: bool = False, tools: list[dict] | None = None) -> RenderedConversation:
    """Render a whole conversation and find, from the template's own renderings, the trained span of every assistant turn.

    For assistant turn i: the conversation before it rendered alone must be a prefix of the whole; the
    turn starts there with the template's generation prompt (or, where the template renders earlier turns
    without part of it, as Qwen3 drops their empty think block, with that prompt's first lines); it ends
    after its content (or its tool calls, see :func:`_tool_call_spans`) and the closing text the template
    writes after the last answer, trailing newline excluded. Nothing is found by searching for a token.
    """
    text = render(tokenizer, messages, False, enable_thinking, tools)
    marked_text, fields = _unmark(render(tokenizer, _marked(messages), False, enable_thinking, tools))
    if marked_text != text:
        raise ValueError(_REWRITES)
    calls = _tool_call_spans(tokenizer, messages, text, False, enable_thinking, tools)
    last = len(messages) - 1
    last_answer = calls[last] if last in calls else fields.get(f"c{last}")
    closing = text[last_answer[1]:].rstrip() if last_answer else ""
    if not closing:
        raise ValueError("The chat template writes nothing after an assistant turn, so the model could never learn to stop.")
    trained = []
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:position], False, enable_thinking, tools)
        prompt = render(tokenizer, messages[:position], True, enable_thinking, tools)
        content = calls.get(position) or fields.get(f"c{position}")
        if not text.startswith(before) or not prompt.startswith(before) or content is None:
            raise ValueError(f"The chat template renders turn {position} differently inside the conversation; cannot mark its trained tokens.")
        header = _turn_header(text[len(before):], prompt[len(before):])
        end = content[1] + len(closing)
        if header is None or text[content[1]:end] != closing:
            raise ValueError(f"The chat template renders assistant turn {position} in an unexpected shape; cannot mark its trained tokens.")
        trained.append((len(before) + len(header), end))
    return RenderedConversation(text, sorted([*fields.values(), *calls.values()]), trained)


def _tool_call_spans(tokenizer, messages: list[dict], text: str, add_generation_prompt: bool, enable_thinking: bool,
                     tools: list[dict] | None) -> dict[int, tuple[int, int]]:
    """Where each assistant turn with tool calls writes its text and calls: position -> (start, end) in ``text``.

    Arguments are rendered with ``tojson``, so no marker can go inside them; instead the conversation is
    rendered again with that one turn's calls and text replaced by a placeholder, and the turn's part of
    the text is what differs between the two renderings (everything before and after it is the same).
    """
    spans = {}
    for position, message in enumerate(messages):
        if not message.get("tool_calls"):
            continue
        placeholder = {key: value for key, value in message.items() if key != "tool_calls"} | {"content": _SLOT}
        other = render(tokenizer, [*messages[:position], placeholder, *messages[position + 1:]], add_generation_prompt, enable_thinking, tools)
        before = len(render(tokenizer, messages[:position], False, enable_thinking, tools))
        start = before + _common_length(text[before:], other[before:])
        end = len(text) - _common_length(text[start:][::-1], other[start:][::-1])
        if end <= start:
            raise ValueError(f"The chat template does not render the tool calls of turn {position}, so they cannot be trained: use a "
                             "checkpoint whose template renders tools (Qwen2.5, Qwen3), or drop the calls.")
        if other[:before] != text[:before]:
            raise ValueError(f"The chat template renders the tool calls of turn {position} in an unexpected shape; cannot mark them.")
        spans[position] = (start, end)
    return spans


def _common_length(first: str, second: str) -> int:
    """The length of the longest common prefix of two strings."""
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def render_prompt(tokenizer, messages: list[dict], enable_thinking: bool = False, tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text (with the generation prompt) and where the messages' texts lie in it (none if the template rewrites them)."""
    text = render(tokenizer, messages, True, enable_thinking, tools)
    try:
        marked_text, fields = _unmark(render(tokenizer, _marked(messages), True, enable_thinking, tools))
        calls = _tool_call_spans(tokenizer, messages, text, True, enable_thinking, tools)
    except ValueError:
        return text, []
    return text, sorted([*fields.values(), *calls.values()]) if marked_text == text else []


def _turn_header(turn: str, generation_prompt: str) -> str | None:
    """The scaffolding that opens an assistant turn: the generation prompt, or its longest run of whole lines the turn starts with."""
    if turn.startswith(generation_prompt):
        return generation_prompt
    lines = generation_prompt.splitlines(keepends=True)
    for count in range(len(lines) - 1, 0, -1):
        header = "".join(lines[:count])
        if header.endswith("\n") and turn.startswith(header):
            return header
    return None


def cut_pieces(text: str, data_spans, trained_spans) -> list[tuple[int, int, bool, bool]]:
    """``text`` cut at every span boundary: (start, end, is data, is trained) for each non-empty piece."""
    cuts = sorted({0, len(text), *(p for span in data_spans for p in span), *(p for span in trained_spans for p in span)})
    return [(start, end, any(a <= start and end <= b for a, b in data_spans), any(a <= start and end <= b for a, b in trained_spans))
            for start, end in zip(cuts, cuts[1:]) if end > start]


# A conversation's skeleton: the same roles rendered with placeholder texts ("\ue003c3\ue002": content of message 3,
# "\ue003r3\ue002": its reasoning), so each shape is rendered, marked and cut into pieces once, not once per record.
_SLOT = "\ue003"
_SLOT_TEXT = re.compile(f"{_SLOT}([cr])(\\d+){_END}")
_SLOT_FIELDS = {"c": "content", "r": "reasoning_content"}
_PRIVATE = re.compile(f"[{_OPEN}{_CLOSE}{_END}{_SLOT}]")


@dataclass
class Skeleton:
    """A conversation shape rendered with placeholder texts: the whole rendering and the pieces to tokenise."""

    segments: list  # the whole rendering: template text (str) or a slot (message index, field)
    pieces: list  # what is tokenised, up to the end of the last trained span: (str or slot, trained)


def skeleton_of(tokenizer, shape: tuple, enable_thinking: bool) -> Skeleton | None:
    """The skeleton of a conversation shape, or None where its pieces are not exactly its texts (the exact path decides)."""
    messages = []
    for position, (role, has_reasoning) in enumerate(shape):
        messages.append({"role": role, "content": f"{_SLOT}c{position}{_END}"})
        if has_reasoning:
            messages[-1]["reasoning_content"] = f"{_SLOT}r{position}{_END}"
    try:
        rendered = render_conversation(tokenizer, messages, enable_thinking)
    except ValueError:
        return None
    end = rendered.trained_spans[-1][1]
    data_spans = [(start, min(stop, end)) for start, stop in rendered.data_spans if start < end]
    pieces = []
    for start, stop, data, trained in cut_pieces(rendered.text[:end], data_spans, rendered.trained_spans):
        slot = _SLOT_TEXT.fullmatch(rendered.text[start:stop])
        if data != bool(slot) or (not data and _SLOT in rendered.text[start:stop]):
            return None
        pieces.append(((int(slot[2]), _SLOT_FIELDS[slot[1]]) if slot else rendered.text[start:stop], trained))
    segments, last = [], 0
    for match in _SLOT_TEXT.finditer(rendered.text):
        segments += [rendered.text[last:match.start()], (int(match[2]), _SLOT_FIELDS[match[1]])]
        last = match.end()
    return Skeleton([*segments, rendered.text[last:]], pieces)


def fits_skeleton(skeleton: Skeleton | None, messages: list[dict], text: str) -> bool:
    """True when the conversation's own rendering is its skeleton with its texts in place, every text non-empty."""
    if skeleton is None or _PRIVATE.search(text):
        return False
    filled = [part if isinstance(part, str) else messages[part[0]][part[1]] for part in skeleton.segments]
    return all(filled[1::2]) and "".join(filled) == text
