"""Cache fingerprints of tokenised data: the data file's bytes, the tokenizer's rules and the kit's data code.

A change to any of them makes ``datasets`` tokenise again instead of reusing a stale cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# What tokenised data depends on besides the settings: the code of these modules (a kit upgrade re-tokenises).
DATA_CODE = tuple(sorted(path.name for path in Path(__file__).parent.glob("*.py")))  # data/: every module that decides tokens


def file_digest(path: Path) -> str:
    """A BLAKE2b digest of the file's bytes, streamed in chunks (about 1 GB/s: a few percent of tokenising it)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the tokenizer's vocabulary and rules, its special tokens, its chat template."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(sorted(tokenizer.get_vocab().items()))
    return fingerprint_of(backend, str(tokenizer.chat_template), repr(tokenizer.special_tokens_map), len(tokenizer))


def fingerprint_of(*parts) -> str:
    """A datasets fingerprint (64 hex digits) of ``parts`` and the kit's data code."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for name in DATA_CODE:
        digest.update((package / name).read_bytes())
    for part in parts:
        digest.update(repr(part).encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()
