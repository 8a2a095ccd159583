"""Where the project keeps what it builds once per machine: $PETALS_LIKE_CACHE, else ~/.cache/petals_like."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The per-machine cache folder (not created here): measured throughput, bench and trained models,
    compiled kernels."""
    return Path(os.environ.get("PETALS_LIKE_CACHE", Path.home() / ".cache" / "petals_like"))
