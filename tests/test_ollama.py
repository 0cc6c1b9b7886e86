"""The Modelfile's TEMPLATE, rendered as Ollama would, must give exactly the text the tokenizer's chat template gives.

Ollama's templates are Go text/template. The renderer below implements the subset the kit's TEMPLATE uses
(if / else if / else / range with variables, trim markers, eq / ne / and / or / not / len / slice), and
Ollama's data model: system messages are joined into .System and also stay in .Messages, and the
Modelfile's SYSTEM is added as a first system message when the conversation has none.
"""

import copy
import re

import pytest

from qwen_helpers.data.encoding import format_prompt
from qwen_helpers.deploy.ollama import default_system_prompt, generation_prefix, modelfile_text, ollama_template

# ------------------------------------------------------------------------------ a Go text/template subset

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
EXPRESSION_TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def lex(template: str) -> list[tuple[str, str]]:
    """Text and action pieces, with Go's trim markers applied to the neighbouring text."""
    pieces, position, trim_next = [], 0, False
    for match in ACTION.finditer(template):
        text = template[position : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        pieces += [("text", text), ("action", match.group(2).strip())]
        trim_next, position = bool(match.group(3)), match.end()
    tail = template[position:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))
    return pieces


def parse(pieces: list, index: int = 0) -> tuple[list, int, str | None]:
    """Nodes until an ``else``/``end`` (returned as the stop word) or the end of the pieces."""
    nodes = []
    while index < len(pieces):
        kind, body = pieces[index]
        index += 1
        if kind == "text":
            nodes.append(("text", body))
        elif body == "end" or body.startswith("else"):
            return nodes, index, body
        elif body.startswith("if "):
            branches, otherwise, condition = [], [], body[3:]
            while True:
                block, index, stop = parse(pieces, index)
                branches.append((condition, block))
                if stop.startswith("else if "):
                    condition = stop[len("else if ") :]
                    continue
                if stop == "else":
                    otherwise, index, stop = parse(pieces, index)
                break
            nodes.append(("if", branches, otherwise))
        elif body.startswith("range "):
            names, expression = body[len("range ") :].split(":=")
            block, index, _ = parse(pieces, index)
            nodes.append(("range", [name.strip() for name in names.split(",")], expression.strip(), block))
        elif re.match(r"^\$\w+ :=", body):
            name, expression = body.split(":=", 1)
            nodes.append(("assign", name.strip(), expression.strip()))
        else:
            nodes.append(("print", body))
    return nodes, index, None


FUNCTIONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "and": lambda a, b: b if a else a,
    "or": lambda a, b: a if a else b,
    "not": lambda a: not a,
    "len": len,
    "slice": lambda items, start: items[start:],
}


def evaluate(tokens: list[str], scope: dict):
    """Evaluate one Go pipeline (a function call or a single operand) given as tokens."""
    operands, index = [], 0
    while index < len(tokens):
        token = tokens[index]
        if token == "(":
            depth, end = 1, index + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[end], 0)
                end += 1
            operands.append(("value", evaluate(tokens[index + 1 : end - 1], scope)))
            index = end
            continue
        operands.append(("token", token))
        index += 1
    values = [value if kind == "value" else operand(value, scope) for kind, value in operands[1:]]
    head_kind, head = operands[0]
    if head_kind == "token" and head in FUNCTIONS:
        return FUNCTIONS[head](*values)
    return head if head_kind == "value" else operand(head, scope)


def operand(token: str, scope: dict):
    if token.startswith('"'):
        return token[1:-1]
    if token.isdigit():
        return int(token)
    if token == ".":
        return scope["dot"]
    if token.startswith("$."):
        return scope["$"][token[2:]]
    if token.startswith("$"):
        return scope["vars"][token]
    if token.startswith("."):
        return scope["dot"][token[1:]]
    raise ValueError(f"unsupported Go template token {token!r}")


def run(nodes: list, scope: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(evaluate(EXPRESSION_TOKEN.findall(node[1]), scope)))
        elif node[0] == "assign":
            scope["vars"][node[1]] = evaluate(EXPRESSION_TOKEN.findall(node[2]), scope)
        elif node[0] == "if":
            _, branches, otherwise = node
            block = next((body for condition, body in branches if evaluate(EXPRESSION_TOKEN.findall(condition), scope)), otherwise)
            out.append(run(block, scope))
        elif node[0] == "range":
            _, names, expression, body = node
            for index, item in enumerate(evaluate(EXPRESSION_TOKEN.findall(expression), scope)):
                inner = {**scope, "dot": item, "vars": {**scope["vars"], names[0]: index, names[-1]: item}}
                out.append(run(body, inner))
    return "".join(out)


def render_go(template: str, data: dict) -> str:
    nodes, _, stop = parse(lex(template))
    assert stop is None, f"unbalanced template: stray {stop!r}"
    return run(nodes, {"dot": data, "$": data, "vars": {}})


def ollama_prompt(template: str, conversation: list[dict], modelfile_system: str | None) -> str:
    """What Ollama sends the model for ``conversation``: its data model, then the Go template."""
    messages = [{"Role": message["role"], "Content": message["content"]} for message in conversation]
    if modelfile_system and not any(message["Role"] == "system" for message in messages):
        messages.insert(0, {"Role": "system", "Content": modelfile_system})
    system = "\n\n".join(message["Content"] for message in messages if message["Role"] == "system")
    return render_go(template, {"System": system, "Messages": messages})


def modelfile_system(modelfile: str) -> str | None:
    match = re.search(r'^SYSTEM """(.*?)"""', modelfile, re.DOTALL | re.MULTILINE)
    return match.group(1) if match else None


def modelfile_template(modelfile: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""', modelfile, re.DOTALL | re.MULTILINE).group(1)


# ------------------------------------------------------------------------------ the tests


def test_go_renderer_follows_go_semantics():
    """The test's renderer itself: trim markers, else-if chains, variables in range, slice/len (known Go outputs)."""
    template = '{{- range $i, $_ := .Items }}{{ $last := eq (len (slice $.Items $i)) 1 }}{{ if eq . "a" }}A{{ else if eq . "b" }}B{{ else }}?{{ end }}{{ if not $last }},{{ end }}{{ end }}  \n {{- " end" }}'
    assert render_go(template, {"Items": ["a", "b", "c"]}) == "A,B,? end"
    assert render_go("x  {{- if .Flag }} y {{ end -}}  z", {"Flag": True}) == "x y z"


CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "把下面的句子翻译成英文。\n今天天气很好。"}],
    "with a system prompt": [{"role": "system", "content": "You translate."}, {"role": "user", "content": "早安"}],
    "multi-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is LoRA?"},
    ],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_modelfile_template_renders_like_the_chat_template(tokenizer, name):
    conversation = CONVERSATIONS[name]
    modelfile = modelfile_text("model-q8_0.gguf", tokenizer)
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ollama_prompt(modelfile_template(modelfile), conversation, modelfile_system(modelfile)) == expected


def test_modelfile_template_matches_the_kit_prompt_format(tokenizer):
    """format_prompt is what training and inference use; the Ollama prompt must equal it for a record with an input."""
    record = {"instruction": "翻译为英文", "input": "早上好"}
    modelfile = modelfile_text("model-q8_0.gguf", tokenizer)
    conversation = [{"role": "user", "content": "翻译为英文\n早上好"}]
    assert ollama_prompt(modelfile_template(modelfile), conversation, modelfile_system(modelfile)) == format_prompt(tokenizer, record)


def test_modelfile_has_from_stops_and_qwen_default_system(tokenizer):
    modelfile = modelfile_text("outputs/x/model-f32.gguf", tokenizer)
    assert "FROM ./model-f32.gguf\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert modelfile_system(modelfile) == default_system_prompt(tokenizer) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert modelfile_system(modelfile_text("m.gguf", tokenizer, system="You translate.")) == "You translate."


# Qwen3's template in non-thinking mode (enable_thinking=False) opens the answer with an empty think block and adds no default system prompt.
QWEN3_NON_THINKING_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)


def test_qwen3_non_thinking_template_gets_the_empty_think_block(tokenizer):
    qwen3 = copy.deepcopy(tokenizer)
    qwen3.chat_template = QWEN3_NON_THINKING_TEMPLATE
    assert generation_prefix(qwen3) == "<think>\n\n</think>\n\n" and default_system_prompt(qwen3) is None
    assert generation_prefix(tokenizer) == ""
    modelfile = modelfile_text("m.gguf", qwen3)
    assert modelfile_system(modelfile) is None
    for conversation in CONVERSATIONS.values():
        expected = qwen3.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(modelfile_template(modelfile), conversation, None) == expected
    assert ollama_template(qwen3) != ollama_template(tokenizer)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_modelfile_asks_in_the_mode_it_is_given(enable_thinking):
    """Thinking mode: nothing after the assistant header (the model opens its think block); else the empty block."""
    from qwen_helpers.models.loading import load_tokenizer

    qwen3 = load_tokenizer("tiny-qwen3")
    modelfile = modelfile_text("m.gguf", qwen3, enable_thinking=enable_thinking)
    for conversation in CONVERSATIONS.values():
        expected = qwen3.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=enable_thinking)
        assert ollama_prompt(modelfile_template(modelfile), conversation, modelfile_system(modelfile)) == expected
    assert ollama_template(qwen3, True) != ollama_template(qwen3, False)
    assert f"thinking mode {'on' if enable_thinking else 'off'}" in modelfile.splitlines()[0]
