"""The tiny checkpoint's tokenizer must tokenise exactly as Qwen2.5's does, with Qwen's special ids."""

import pytest


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [9707, 1879]),
        (" Hello world", [21927, 1879]),
        ("Hello, world!", [9707, 11, 1879, 0]),
        ("2024", [17, 15, 17, 19]),  # Qwen2 splits digits one per token
        ("你好", [108386]),
    ],
)
def test_encodings_match_qwen2_5(tokenizer, text, ids):
    assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_special_token_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False) == [151644, 872]


def test_chat_template_is_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_round_trip_decodes_bilingual_text(tokenizer):
    text = "翻译为英文：早安，Qwen 2.5!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
