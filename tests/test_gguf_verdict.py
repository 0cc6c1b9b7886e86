"""The GGUF check's verdict: f16 may differ from transformers only where f16's rounding can flip a near-tie;
f32 must be identical; a real difference, or a prompt the GGUF tokenises wrongly, fails every exact type."""

import math

import pytest

from qwen_helpers.deploy.gguf import TIE_NATS, compare_prompt, verdict

PROMPT = [1, 2, 3]


def sides(reference: list[int], runner_up_margin: float, gguf_argmax: list[int], gguf_answer: list[int] | None = None,
          gguf_ids: list[int] | None = None):
    """transformers' side (its answer, with token 99 the runner-up at every position, ``runner_up_margin`` nats behind)
    and llama.cpp's (its argmax on transformers' answer, its own greedy answer, its prompt ids)."""
    top = [{token: math.log(0.5), 99: math.log(0.5) - runner_up_margin} for token in reference]
    hf = {"prompt_ids": PROMPT, "served_ids": PROMPT, "reference": reference, "typed_control_tokens": [],
          "top_logprobs": top, "reference_logprobs": [math.log(0.5)] * len(reference)}
    gguf = {"gguf_ids": gguf_ids or PROMPT, "argmax": gguf_argmax, "gguf_answer": gguf_answer or gguf_argmax,
            "reference_logprobs": [math.log(0.5)] * len(reference)}
    return hf, gguf


def test_identical_answers_pass_every_type():
    row = compare_prompt(*sides([5, 6, 7], 1.0, [5, 6, 7]))
    assert row.first_divergence is None and verdict([row], "f32") and verdict([row], "f16")


def test_a_near_tie_flipped_by_f16_passes_f16_only():
    # the reported case: the first new token differs, transformers' top two 0.001 nats apart; the rest agree teacher-forced
    row = compare_prompt(*sides([5, 6, 7], 0.001, [99, 6, 7], gguf_answer=[99, 8, 8]))
    assert (row.first_divergence, row.near_ties, row.mismatches) == (0, 1, 0)
    assert verdict([row], "f16") and not verdict([row], "f32")


@pytest.mark.parametrize("margin", [TIE_NATS * 5, 2.0])
def test_a_flip_that_is_no_near_tie_fails(margin):
    row = compare_prompt(*sides([5, 6, 7], margin, [99, 6, 7]))
    assert row.mismatches == 1 and not verdict([row], "f16")


def test_a_token_transformers_did_not_rank_near_the_top_is_a_real_difference():
    row = compare_prompt(*sides([5, 6, 7], 0.001, [5, 42, 7]))  # 42 is not among transformers' kept top tokens
    assert (row.near_ties, row.mismatches) == (0, 1) and not verdict([row], "f16")


def test_wrong_prompt_ids_fail_whatever_the_answers():
    row = compare_prompt(*sides([5, 6, 7], 1.0, [5, 6, 7], gguf_ids=[1, 2, 4]))
    assert not verdict([row], "f16") and not verdict([row], "q8_0")


def test_quantised_types_are_judged_by_tokenisation_alone():
    row = compare_prompt(*sides([5, 6, 7], 2.0, [99, 99, 99]))
    assert verdict([row], "q4_k_m")
