"""Where a trained model's loss goes, token by token: which trained tokens still cost nats, and whether each is the
model's first choice anyway.

A loss that stops falling is not always a model that stopped learning. On the kit's tiny model the output layer is
random and frozen (LoRA adapts the layers below it): a token's logit is the final hidden state (RMS-normalised, its
scale frozen too) times that token's row, so how far one token can be raised above all the others is capped by the
geometry of those fixed rows. Every answer can come out word for word (each trained token the argmax) while each
token still costs a fixed share of a nat, the same in every record for a token such as ``<|im_end|>``.
"""

from __future__ import annotations


def trained_token_losses(model, tokenizer, records: list[dict], enable_thinking: bool = False) -> list[list[dict]]:
    """Per record, one row per trained token (those with a label, as training tokenises the record): the token, its
    loss in nats (-log p under the model, in its current mode) and whether it is the model's most likely token there."""
    import torch

    from ..data.encoding import tokenize_example
    from ..models.generation import token_logprobs

    rows = []
    for record in records:
        example = tokenize_example(tokenizer, record, enable_thinking=enable_thinking)
        logps = token_logprobs(model, example["input_ids"])  # row i predicts token i + 1
        labels = torch.tensor(example["labels"][1:], device=logps.device)
        trained = (labels != -100).nonzero().flatten()
        rows.append([{"token": tokenizer.decode([labels[i].item()]), "loss": -logps[i, labels[i]].item(),
                      "argmax": bool(logps[i].argmax().item() == labels[i].item())} for i in trained.tolist()])
    return rows


def loss_floor_line(per_record: list[list[dict]], end_token: str = "<|im_end|>") -> str:
    """One sentence on what the remaining loss is: the share of trained tokens that are already the model's first
    choice, the mean loss per trained token, and what the closing ``end_token`` costs in each record."""
    tokens = [row for rows in per_record for row in rows]
    ends = [row["loss"] for rows in per_record for row in rows if row["token"] == end_token]
    ends_part = (f"; {end_token} alone costs {min(ends):.3f}-{max(ends):.3f} nats in every record" if ends else "")
    return (f"{sum(row['argmax'] for row in tokens)} of {len(tokens)} trained tokens are the model's first choice, "
            f"yet they cost {sum(row['loss'] for row in tokens) / len(tokens):.3f} nats each on average{ends_part}")
