"""Importing the kit never reaches the network: bitsandbytes' import-time hub lookup (AVX512-BF16 CPUs) runs offline."""

import subprocess
import sys
import textwrap

# A fresh interpreter that takes bitsandbytes down its AVX512-BF16 path (has_avx512bf16 forced True as
# bitsandbytes.functional is executed), records every network lookup instead of making it, then imports the kit and
# peft as a command does, and reports what happened.
PROBE = textwrap.dedent("""
    import importlib.abc, importlib.util, json, socket, sys

    lookups = []
    def refuse(host, *args, **kwargs):
        lookups.append(str(host))
        raise OSError("the probe allows no network")
    socket.getaddrinfo = refuse
    socket.create_connection = lambda address, *args, **kwargs: refuse(address[0])

    class ForceBF16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "bitsandbytes.functional":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            real = spec.loader.exec_module
            def exec_module(module):
                real(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, ForceBF16())
    import kernels
    asked = []
    real_get_kernel = kernels.get_kernel
    def get_kernel(repo_id, *args, **kwargs):
        from huggingface_hub import constants
        asked.append([repo_id, constants.is_offline_mode()])
        return real_get_kernel(repo_id, *args, **kwargs)
    kernels.get_kernel = get_kernel
    FIRST
    import peft, bitsandbytes
    from huggingface_hub import constants
    print(json.dumps({"asked": asked, "lookups": lookups, "offline_after": constants.is_offline_mode()}))
""")


def probe(first: str) -> tuple[dict, str]:
    import json

    done = subprocess.run([sys.executable, "-c", PROBE.replace("FIRST", first)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_the_kit_lets_bitsandbytes_ask_only_an_offline_hub_and_says_nothing():
    report, stderr = probe("import qwen_helpers")
    assert report["asked"] == [["kernels-community/quantization-bitsandbytes", True]]  # the lookup did happen, offline
    assert report["lookups"] == []  # nothing tried to reach a host
    assert report["offline_after"] is False  # the user's own downloads (--model_path Qwen/...) stay possible
    assert "gemm_4bit_forward" not in stderr and "kernels-community" not in stderr


def test_without_the_kit_the_same_import_reaches_for_the_network():
    """The control: the probe does detect a lookup, so the test above could fail."""
    report, _ = probe("pass")
    assert report["asked"] == [["kernels-community/quantization-bitsandbytes", False]]
    assert report["lookups"], "bitsandbytes' lookup should have tried to resolve the hub's host"
