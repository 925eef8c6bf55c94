"""Downloads and checksums shared by the dataset loaders (urllib and hashlib only)."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

__all__ = ["fetch_url", "file_md5"]


def file_md5(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks of ``chunk_size`` bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Write the body of ``url`` to ``dest`` (urllib only; raises on any HTTP or network error)."""
    request = urllib.request.Request(url, headers={"User-Agent": "ppo_cbp"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as f:
        while block := response.read(1 << 20):
            f.write(block)
