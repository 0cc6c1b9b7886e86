"""An Ollama Modelfile whose TEMPLATE asks the model exactly as training did (ChatML, system prompt, Qwen3's mode).

Ollama imports a GGUF with a bare ``{{ .Prompt }}`` template, so a fine-tuned Qwen answers garbage until
its chat format is spelled out. The pieces that differ between checkpoints are read from the
tokenizer's own chat template through :func:`qwen_helpers.data.encoding.format_prompt`, the one prompt format:
the system prompt the template adds when none is given (Qwen2.5: "You are Qwen, ..."), and what follows
``<|im_start|>assistant\\n`` in a generation prompt (Qwen3 in non-thinking mode: an empty think block; in
thinking mode: nothing, the model opens its think block itself). The mode and the system prompt are the
ones the adapter was trained with (:mod:`qwen_helpers.run.prompt_settings`), passed in by the export.

    ollama create my-qwen -f outputs/lora_gguf/Modelfile && ollama run my-qwen
"""

from __future__ import annotations

from pathlib import Path

from ..data.encoding import format_prompt
from ..common.files import atomic_write_text
from ..models.generation import STOP_TOKENS

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


def default_system_prompt(tokenizer, enable_thinking: bool = False) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (Qwen2.5's "You are Qwen, ..."), or None."""
    text = format_prompt(tokenizer, {"instruction": PROBE}, enable_thinking)
    if not text.startswith(SYSTEM_HEADER):
        return None
    return text[len(SYSTEM_HEADER) : text.index("<|im_end|>")]


def generation_prefix(tokenizer, enable_thinking: bool = False) -> str:
    """What the prompt format puts after ``<|im_start|>assistant\\n`` before the model's first token.

    Qwen3 in non-thinking mode: ``<think>\\n\\n</think>\\n\\n``; in thinking mode and for Qwen2.5: nothing.
    """
    text = format_prompt(tokenizer, {"instruction": PROBE}, enable_thinking)
    return text[text.rindex(ASSISTANT_HEADER) + len(ASSISTANT_HEADER) :]


def ollama_template(tokenizer, enable_thinking: bool = False) -> str:
    """The Modelfile TEMPLATE for this tokenizer's chat format in the given thinking mode."""
    return TEMPLATE.format(generation_prefix=generation_prefix(tokenizer, enable_thinking))


def quoted(text: str) -> str:
    """A Modelfile triple-quoted value; refuses text that would end the quote early."""
    if '"""' in text:
        raise ValueError('A Modelfile value cannot contain three double quotes in a row (""").')
    return f'"""{text}"""'


def modelfile_text(gguf_file: str, tokenizer, system: str | None = None, enable_thinking: bool = False) -> str:
    """The Modelfile: FROM the GGUF beside it, the chat TEMPLATE, both stop tokens, and the system prompt training used."""
    system = system or default_system_prompt(tokenizer, enable_thinking)
    has_modes = generation_prefix(tokenizer, True) != generation_prefix(tokenizer, False)  # Qwen3's thinking switch
    mode = f" (thinking mode {'on' if enable_thinking else 'off'})" if has_modes else ""
    lines = [
        f"# Written by python -m qwen_helpers.export: the chat format the adapter was trained with{mode}.",
        f"FROM ./{Path(gguf_file).name}",
        f"TEMPLATE {quoted(ollama_template(tokenizer, enable_thinking))}",
        *(f'PARAMETER stop "{token}"' for token in STOP_TOKENS),
    ]
    if system:
        lines.append(f"SYSTEM {quoted(system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_file: str, tokenizer, system: str | None = None, enable_thinking: bool = False) -> Path:
    """Write ``Modelfile`` next to ``gguf_file`` (replaced whole or not at all) and return its path."""
    path = Path(gguf_file).with_name("Modelfile")
    atomic_write_text(path, modelfile_text(gguf_file, tokenizer, system, enable_thinking))
    return path
