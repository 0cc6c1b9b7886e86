"""The only code that calls into llama.cpp, run as a child process: a native crash fails one step, not the caller.

llama.cpp is C++; a bug in one of its CPU kernels (seen: a segfault decoding q8_0/q4_k_m on a CPU with AVX-512
and AMX) kills the whole process that runs it. So the export command, the test run and a notebook kernel never
load it themselves: :func:`qwen_helpers.deploy.gguf.run_llama` starts this file as a script, with a JSON
request, and reads a JSON answer back; a crash reaches the parent as a negative exit status.

This file imports only the standard library, numpy and llama_cpp (no torch, no qwen_helpers): it starts in
about a second and works whatever ``sys.path`` the parent had.

    python qwen_helpers/deploy/llama_child.py REQUEST.json ANSWER.json
"""

from __future__ import annotations

import json
import sys


def quantize(source: str, target: str, ftype: str, threads: int) -> dict:
    """llama.cpp's own quantizer (``llama_model_quantize``, as the llama-quantize tool) from ``source`` to ``target``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads
    return {"status": int(llama_cpp.llama_model_quantize(source.encode(), target.encode(), params))}


def log_softmax(logits):
    import numpy as np

    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy(llm, prompt_ids: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """Greedy answer from llama.cpp: argmax of its own logits, cut after the first stop token (as the kit's generate)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    answer = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        answer.append(token)
        if token in stops:
            break
        llm.eval([token])
    return answer


def verify(gguf_file: str, context_tokens: int, threads: int, prompts: list[dict], stops: list[int],
           max_new_tokens: int) -> dict:
    """For each prompt: llama.cpp's own ids for its text, its greedy answer to the kit's ids, and how it scores
    transformers' answer fed the same prefix (argmax and log-prob of each reference token).

    The KV cache is kept in f32 (llama.cpp's default is f16): its rounding would otherwise be measured as a
    difference of the exported weights, and it flips near-tied greedy tokens of an exact f32 export.
    """
    import numpy as np
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=gguf_file, n_ctx=context_tokens, logits_all=True, n_threads=threads,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, verbose=False)
    rows = []
    for prompt in prompts:
        ids, reference = prompt["prompt_ids"], prompt["reference"]
        gguf_ids = [int(token) for token in llm.tokenize(prompt["text"].encode("utf-8"), add_bos=False, special=True)]
        answer = greedy(llm, ids, stops, max_new_tokens)
        llm.reset()
        llm.eval(ids + reference)
        scores = np.array(llm.scores[len(ids) - 1 : len(ids) + len(reference) - 1], dtype=np.float64)
        logprobs = log_softmax(scores)
        rows.append({
            "gguf_ids": gguf_ids,
            "gguf_answer": answer,
            "argmax": [int(token) for token in logprobs.argmax(axis=1)],
            "reference_logprobs": [float(logprobs[row, token]) for row, token in enumerate(reference)],
        })
    return {"rows": rows}


OPERATIONS = {"quantize": quantize, "verify": verify}


def main(argv: list[str]) -> int:
    request_file, answer_file = argv
    with open(request_file, encoding="utf-8") as file:
        request = json.load(file)
    answer = OPERATIONS[request["operation"]](**request["arguments"])
    with open(answer_file, "w", encoding="utf-8") as file:
        json.dump(answer, file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
