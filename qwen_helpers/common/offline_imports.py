"""bitsandbytes asks the Hugging Face hub for an optional kernel while it is imported; the kit lets it ask an offline hub.

On CPUs with AVX512-BF16, importing bitsandbytes (which ``import peft`` does) calls ``kernels.get_kernel(
"kernels-community/quantization-bitsandbytes")``: a download at import time, from a package the user never asked
for, and a warning when it fails. Its own CPU kernels work without it. :func:`import_bitsandbytes_offline` puts a
finder first on ``sys.meta_path`` that runs bitsandbytes' import (its first one only) with huggingface_hub's offline
switch on, so any request made during it fails at once without reaching the network; the switch is restored
afterwards, so the user's own hub downloads (``--model_path Qwen/...``) are untouched. The failed lookup's warning
is the one bitsandbytes logs at ``bitsandbytes.backends.cpu.ops``, kept below ERROR.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys

PACKAGE = "bitsandbytes"


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub's offline switch on for the block (every request through its session raises at once)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


class _OfflineLoader(importlib.abc.Loader):
    """bitsandbytes' own loader, executing the package with the hub offline."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        kernels_log = logging.getLogger("kernels")
        level = kernels_log.level
        kernels_log.setLevel(logging.ERROR)  # its notes on the lookup that cannot succeed
        try:
            with hub_offline():
                self.loader.exec_module(module)
        finally:
            kernels_log.setLevel(level)


class _OfflineBitsandbytesFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != PACKAGE:
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


def import_bitsandbytes_offline() -> None:
    """Arrange for bitsandbytes' first import in this process to run with the hub offline (see the module's text)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if PACKAGE in sys.modules or any(isinstance(finder, _OfflineBitsandbytesFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _OfflineBitsandbytesFinder())
