"""Reward functions for GRPO: plain Python callables with TRL's signature,
``(prompts, completions, **columns) -> list[float]``.

``prompts`` and ``completions`` are the texts (the kit renders prompts itself, so they are strings); every other
column of the data file arrives as a keyword list, one value per completion (``answer`` for :func:`exact_match`).
TRL also passes ``completion_ids``. ``--reward exact_match,format`` picks functions by name from :data:`REWARDS`;
a notebook passes its own callables directly.
"""

from __future__ import annotations

import re

from ..common.errors import FlagError

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_THEN_ANSWER = re.compile(
    r"\s*<think>\s*\S.*?</think>\s*<answer>.+?</answer>\s*", re.DOTALL
)  # Qwen3's thinking format
HAN = re.compile(r"[\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")


def extract_answer(completion: str) -> str:
    """The text inside the last ``<answer>...</answer>``, else the whole completion, stripped."""
    tagged = ANSWER_TAG.findall(completion)
    return (tagged[-1] if tagged else completion).strip()


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 where the extracted answer equals the record's ``answer`` column exactly (GSM8K-style), else 0.0."""
    return [
        float(extract_answer(completion) == str(expected).strip()) for completion, expected in zip(completions, answer)
    ]


def answer_format(prompts, completions, **kwargs) -> list[float]:
    """1.0 for a completion that is one ``<answer>...</answer>`` and nothing else, 0.5 if the tag is somewhere in it."""
    return [
        1.0 if re.fullmatch(r"\s*<answer>.+?</answer>\s*", c, re.DOTALL) else 0.5 if ANSWER_TAG.search(c) else 0.0
        for c in completions
    ]


def think_format(prompts, completions, **kwargs) -> list[float]:
    """1.0 for Qwen3's think-then-answer: a non-empty ``<think>`` block, then ``<answer>...</answer>``."""
    return [float(bool(THINK_THEN_ANSWER.fullmatch(completion))) for completion in completions]


def length_penalty(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """-0.01 per completion token (characters / 4 without ids): among equally good answers, shorter wins."""
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(c) / 4 for c in completions]
    return [-0.01 * length for length in lengths]


def _prompt_language(prompt: str) -> str:
    user_turn = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0]  # the question, not the system prompt
    return "zh" if HAN.search(user_turn) else "en"


def language_match(prompts, completions, language=None, **kwargs) -> list[float]:
    """Share of the completion's letters in the prompt's script (Han for Chinese, Latin for English), 0 with no letters.

    Language consistency as in DeepSeek-R1's RL; the ``language`` column ("zh"/"en") overrides the detection.
    """
    scores = []
    for position, (prompt, completion) in enumerate(zip(prompts, completions)):
        wanted = language[position] if language is not None else _prompt_language(prompt)
        han, latin = len(HAN.findall(completion)), len(LATIN.findall(completion))
        scores.append((han if wanted == "zh" else latin) / (han + latin) if han + latin else 0.0)
    return scores


REWARDS = {
    "exact_match": exact_match,
    "format": answer_format,
    "think_format": think_format,
    "length_penalty": length_penalty,
    "language": language_match,
}
COLUMNS_NEEDED = {"exact_match": "answer"}  # the data column a reward reads


def reward_names(spec: str) -> list[str]:
    """``--reward``'s comma-separated names, checked: an unknown one is a one-line error."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in REWARDS]
    if not names or unknown:
        what = f"unknown reward {', '.join(map(repr, unknown))}" if unknown else "no reward named"
        raise FlagError(
            f"--reward {spec!r}: {what}; choose from {', '.join(REWARDS)} (comma-separated), "
            "or pass your own functions to GRPOTrainer in Python."
        )
    return names


def resolve_rewards(spec: str) -> list:
    """The reward callables ``--reward`` names, in order."""
    return [REWARDS[name] for name in reward_names(spec)]
