"""Generation metrics: chrF, BLEU and exact match, per task and overall, computed with sacrebleu.

BLEU needs words; Chinese has no spaces, so each record's reference decides its tokenisation:
sacrebleu's ``zh`` tokenizer when it contains Chinese characters, ``13a`` (sacrebleu's default) otherwise.
Corpus BLEU over a mixed set is then the usual corpus BLEU of the records tokenised that way.
chrF works on characters and needs no tokenizer. Classification metrics live in ``classification.py``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

from ..data.tool_calls import reference_tool_calls, tool_calls_match

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")
ALL_TASKS = "all"


def bleu_tokenizer_for(reference: str) -> str:
    """sacrebleu tokenizer name for one reference: 'zh' when it contains Chinese characters, else '13a'."""
    return "zh" if CJK.search(reference) else "13a"


@lru_cache(maxsize=None)
def _sacrebleu_tokenizer(name: str):
    from sacrebleu.metrics.bleu import BLEU

    return BLEU(tokenize=name).tokenizer


def tokenize_for_bleu(text: str, name: str) -> str:
    """``text`` split into space-separated tokens by sacrebleu's tokenizer ``name`` ('zh' or '13a')."""
    return _sacrebleu_tokenizer(name)(text.strip())


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100), each record tokenised by the script of its reference.

    Over the n-gram orders the answers have (sacrebleu's effective order): a set of answers all shorter than four
    tokens (labels, numbers, one-word answers) has no 4-grams, and standard BLEU would give it 0 even when every
    answer is right. Where the answers do have 4-grams the score is standard corpus BLEU.
    """
    import sacrebleu

    names = [bleu_tokenizer_for(reference) for reference in references]
    hypotheses = [tokenize_for_bleu(prediction, name) for prediction, name in zip(predictions, names)]
    tokenized_references = [tokenize_for_bleu(reference, name) for reference, name in zip(references, names)]
    return sacrebleu.corpus_bleu(hypotheses, [tokenized_references], tokenize="none", use_effective_order=True).score


def corpus_chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100): character n-gram F-score, language-independent."""
    import sacrebleu

    return sacrebleu.corpus_chrf([prediction.strip() for prediction in predictions], [[reference.strip() for reference in references]]).score


def exact_match(predictions: list[str], references: list[str], calls_match: list[bool] | None = None) -> float:
    """Share (0-100) of predictions identical to their reference, ignoring surrounding whitespace; with ``calls_match``
    (one per record: the predicted tool calls equal the answer's), a record matches only if its calls do too."""
    matches = sum(prediction.strip() == reference.strip() and (calls_match is None or calls_match[index])
                  for index, (prediction, reference) in enumerate(zip(predictions, references)))
    return 100.0 * matches / len(references)


def generation_scores(predictions: list[str], references: list[str], calls_match: list[bool] | None = None) -> dict:
    """chrF, BLEU and exact match of one set of predictions (all on a 0-100 scale).

    ``calls_match`` (records that may call tools): whether each prediction's parsed calls equal the answer's. Exact
    match then needs both text and calls, and ``tool_call_match`` is the share of equal calls. The text of an answer
    that only calls a tool is empty, so without it a wrong call would score as an exact match.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: they must pair up one to one.")
    if not references:
        raise ValueError("No references to score against.")
    scores = {
        "records": len(references),
        "chrf": corpus_chrf(predictions, references),
        "bleu": corpus_bleu(predictions, references),
        "exact_match": exact_match(predictions, references, calls_match),
    }
    if calls_match is not None:
        scores["tool_call_match"] = 100.0 * sum(calls_match) / len(calls_match)
    return scores


def calls_matching(records: list[dict], predicted_calls: list[list[dict]]) -> list[bool]:
    """Per record: the predicted tool calls equal the answer's (none for an answer in text)."""
    return [tool_calls_match(calls, reference_tool_calls(record)) for record, calls in zip(records, predicted_calls, strict=True)]


def tool_call_exact_match(records: list[dict], predicted_calls: list[list[dict]]) -> float:
    """Share (0-100) of records whose predicted tool calls equal the answer's: same names, arguments equal as parsed JSON.

    A record answered in text counts as a match when the prediction calls no tool either.
    """
    return 100.0 * sum(calls_matching(records, predicted_calls)) / len(records)


def scores_by_task(records: list[dict], predictions: list[str], tool_calls: list[list[dict]] | None = None) -> list[dict]:
    """One row of scores per task (the records' "task" field) and one for all records, task "all" last.

    With the predictions' parsed ``tool_calls``, and test records that call tools, exact match counts the calls too and
    each row also has ``tool_call_match``.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[record.get("task") or "-"].append(index)
    judged = tool_calls is not None and any(record.get("tool_calls") for record in records)
    calls = calls_matching(records, tool_calls) if judged else None
    rows = []
    for task, indices in [*((task, groups[task]) for task in sorted(groups)), (ALL_TASKS, range(len(records)))]:
        rows.append({"task": task, **generation_scores([predictions[i] for i in indices], [records[i]["output"] for i in indices],
                                                       [calls[i] for i in indices] if calls is not None else None)})
    return rows


def format_table(rows: list[dict], digits: int = 1) -> str:
    """A plain-text table of dict rows (same keys), numbers rounded: for terminals and logs."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[f"{row[column]:.{digits}f}" if isinstance(row[column], float) else str(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)
