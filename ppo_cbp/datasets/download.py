"""Downloads and checksums shared by the dataset loaders (urllib and hashlib only).

A failed download (no network, every mirror failing, a wrong checksum, a folder that cannot be
written) is a :class:`DownloadError`: one line, shown as ``error: ...`` by the scripts, and the
folders it created are removed again (:func:`download_folder`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ppo_cbp import run_folder
from ppo_cbp.errors import UsageError

__all__ = ["DownloadError", "download_folder", "fetch_url", "file_md5"]


class DownloadError(UsageError, RuntimeError):
    """A download failed: every attempt, named in one line (a :class:`UsageError`, exit 2)."""


@contextlib.contextmanager
def download_folder(data_dir: Path) -> Iterator[Path]:
    """``data_dir``, checked to be writable (:func:`ppo_cbp.run_folder.check_writable`: one
    ``--data-dir`` line if not) and created; when the body raises, the folders created here are
    removed again if they are empty (a failed download leaves nothing behind)."""
    data_dir = Path(data_dir)
    run_folder.check_writable(data_dir, "--data-dir")
    created = []
    folder = data_dir
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    done = False
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        yield data_dir
        done = True
    except OSError as e:  # a write failing midway (disk full, permissions changed)
        raise DownloadError(f"cannot write into --data-dir {data_dir}: {e}") from None
    finally:
        if not done:
            for d in created:  # the deepest first
                with contextlib.suppress(OSError):
                    d.rmdir()


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
