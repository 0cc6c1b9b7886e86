"""An Ollama Modelfile whose TEMPLATE asks the model exactly as training did (ChatML, Qwen's default system prompt, Qwen3's think block).

Ollama imports a GGUF with a bare ``{{ .Prompt }}`` template, so a fine-tuned Qwen answers garbage until
its chat format is spelled out. The pieces that differ between checkpoints are read from the
tokenizer's own chat template through :func:`qwen_helpers.data.format_prompt`, the one prompt format:
the system prompt the template adds when none is given (Qwen2.5: "You are Qwen, ..."), and what follows
``<|im_start|>assistant\\n`` in a generation prompt (Qwen3 in non-thinking mode: an empty think block).

    ollama create my-qwen -f outputs/lora_gguf/Modelfile && ollama run my-qwen
"""

from __future__ import annotations

from pathlib import Path

from .data import format_prompt
from .generation import STOP_TOKENS

ASSISTANT_HEADER = "<|im_start|>assistant\n"
SYSTEM_HEADER = "<|im_start|>system\n"
PROBE = "PROBE-USER-MESSAGE"  # a user message no template rewrites

# Go template (text/template) in Ollama's ``.Messages`` form, as Ollama's own Qwen2.5 template; {generation_prefix}
# is filled in Python. System messages are collected into .System by Ollama and also left in .Messages: skip them there.
TEMPLATE = """{{{{- if .System }}}}<|im_start|>system
{{{{ .System }}}}<|im_end|>
{{{{ end }}}}
{{{{- range $i, $_ := .Messages }}}}
{{{{- $last := eq (len (slice $.Messages $i)) 1 -}}}}
{{{{- if eq .Role "user" }}}}<|im_start|>user
{{{{ .Content }}}}<|im_end|>
{{{{ else if eq .Role "assistant" }}}}<|im_start|>assistant
{{{{ .Content }}}}{{{{ if not $last }}}}<|im_end|>
{{{{ end }}}}
{{{{- end }}}}
{{{{- if and (ne .Role "assistant") $last }}}}<|im_start|>assistant
{generation_prefix}{{{{ end }}}}
{{{{- end }}}}"""


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (Qwen2.5's "You are Qwen, ..."), or None."""
    text = format_prompt(tokenizer, {"instruction": PROBE})
    if not text.startswith(SYSTEM_HEADER):
        return None
    return text[len(SYSTEM_HEADER) : text.index("<|im_end|>")]


def generation_prefix(tokenizer) -> str:
    """What the prompt format puts after ``<|im_start|>assistant\\n`` before the model's first token (Qwen3 non-thinking: ``<think>\\n\\n</think>\\n\\n``)."""
    text = format_prompt(tokenizer, {"instruction": PROBE})
    return text[text.rindex(ASSISTANT_HEADER) + len(ASSISTANT_HEADER) :]


def training_system_prompt(records: list[dict]) -> str | None:
    """The system prompt every training record shares, or None when they have none (or several different ones)."""
    prompts = {record.get("system") or None for record in records}
    return prompts.pop() if len(prompts) == 1 else None


def ollama_template(tokenizer) -> str:
    """The Modelfile TEMPLATE for this tokenizer's chat format."""
    return TEMPLATE.format(generation_prefix=generation_prefix(tokenizer))


def quoted(text: str) -> str:
    """A Modelfile triple-quoted value; refuses text that would end the quote early."""
    if '"""' in text:
        raise ValueError('A Modelfile value cannot contain three double quotes in a row (""").')
    return f'"""{text}"""'


def modelfile_text(gguf_file: str, tokenizer, system: str | None = None) -> str:
    """The Modelfile: FROM the GGUF beside it, the chat TEMPLATE, both stop tokens, and the system prompt training used."""
    system = system or default_system_prompt(tokenizer)
    lines = [
        "# Written by python -m qwen_helpers.export: the chat format the adapter was trained with.",
        f"FROM ./{Path(gguf_file).name}",
        f"TEMPLATE {quoted(ollama_template(tokenizer))}",
        *(f'PARAMETER stop "{token}"' for token in STOP_TOKENS),
    ]
    if system:
        lines.append(f"SYSTEM {quoted(system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_file: str, tokenizer, system: str | None = None) -> Path:
    """Write ``Modelfile`` next to ``gguf_file`` and return its path."""
    path = Path(gguf_file).with_name("Modelfile")
    path.write_text(modelfile_text(gguf_file, tokenizer, system), encoding="utf-8")
    return path
