"""CIFAR-100 from the standard ``cifar-100-python`` files, read without executing pickled code.

Files
-----
The canonical archive ``cifar-100-python.tar.gz`` (MD5 ``eb9058c3a382ffc7106e4002c42a8d85``)
unpacks to ``cifar-100-python/{train, test, meta}``. ``train`` and ``test`` are pickled dicts
with bytes keys (written by Python 2; read with ``encoding="bytes"``):

* ``b"data"``: uint8 array ``[N, 3072]``, each row channel-planar (1024 red, 1024 green, 1024
  blue values, each plane row-major 32x32), so ``row.reshape(3, 32, 32)`` is CHW;
* ``b"fine_labels"``: list of N ints in 0..99; ``b"coarse_labels"``, ``b"filenames"``.

``meta`` holds ``b"fine_label_names"`` (100 bytes strings). N is 50,000 for ``train`` and
10,000 for ``test`` (500 and 100 per class).

Safe loading
------------
:class:`RestrictedUnpickler` resolves only the globals these files need (NumPy's array
reconstruction, ``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode`` with which protocol-2
pickles written by Python 3 spell bytes, and built-in containers); any other global raises
:class:`pickle.UnpicklingError` naming it, before it is imported or called.

Splits of the class-incremental benchmark
-----------------------------------------
Per class, in file order: the first ``validation_per_class`` (50) training images are the
validation set and the next ``train_per_class`` (450) the training set (as in the paper's
code); the first ``test_per_class`` (100) test images are the test set.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppo_cbp.datasets.download import DownloadError, download_folder, fetch_url, file_md5
from ppo_cbp.errors import MissingFileError, UsageError

__all__ = [
    "CIFAR100_MD5",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR100_URL",
    "CIFAR100Data",
    "RestrictedUnpickler",
    "cifar100_folder",
    "download_cifar100",
    "load_cifar100",
    "per_class_split",
    "safe_unpickle",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
"""Per-channel mean of the training pixels in [0, 1] (the paper's normalisation constants)."""
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
"""Per-channel standard deviation of the training pixels in [0, 1]."""

_FILES = ("train", "test", "meta")
_FORMAT = (
    "expected the cifar-100-python files: pickled dicts with b'data' (uint8 [N, 3072], "
    "channel-planar) and b'fine_labels' (N ints in 0..99); meta with b'fine_label_names'"
)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves NumPy array reconstruction and built-in containers."""

    def find_class(self, module: str, name: str):
        # protocol <= 2 pickles spell the builtins module as Python 2 did
        canonical = "builtins" if module == "__builtin__" else module
        if (canonical, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR-100 files hold only NumPy "
                "arrays and built-in containers"
            )
        return super().find_class(module, name)


def safe_unpickle(path: str | os.PathLike[str]) -> object:
    """Load a pickle with :class:`RestrictedUnpickler` (``encoding="bytes"``)."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(io.BytesIO(f.read()), encoding="bytes").load()


def cifar100_folder(data_dir: str | os.PathLike[str]) -> Path:
    """The folder holding ``train``/``test``/``meta``: ``data_dir/cifar-100-python`` or ``data_dir``."""
    data_dir = Path(data_dir)
    nested = data_dir / "cifar-100-python"
    return nested if (nested / "train").is_file() else data_dir


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = []
    for m in tar.getmembers():
        path = Path(m.name)
        if path.is_absolute() or ".." in path.parts or not (m.isfile() or m.isdir()):
            raise ValueError(f"unexpected member {m.name!r} in the CIFAR-100 archive")
        if path.parts[0] != "cifar-100-python":
            raise ValueError(f"unexpected member {m.name!r} outside cifar-100-python/")
        members.append(m)
    return members


def download_cifar100(
    data_dir: str | os.PathLike[str],
    url: str | None = None,
    md5: str | None = None,
    fetch: Callable[[str, Path], None] | None = None,
) -> Path:
    """Download and unpack the canonical archive into ``data_dir`` (skipped if already there).

    The archive goes to a temporary file, its MD5 is checked, and only then are its members
    (regular files and folders under ``cifar-100-python/``, nothing else) extracted.

    :param url: default :data:`CIFAR100_URL`.
    :param md5: expected hex MD5 of the archive, default :data:`CIFAR100_MD5`.
    :param fetch: ``fetch(url, dest_path)`` writing the body to ``dest_path`` (default:
        :func:`~ppo_cbp.datasets.mnist.fetch_url`).
    :return: the folder holding ``train``, ``test`` and ``meta``.
    :raises ValueError: the MD5 differs or the archive holds unexpected members.
    """
    url = CIFAR100_URL if url is None else url
    md5 = CIFAR100_MD5 if md5 is None else md5
    data_dir = Path(data_dir)
    folder = data_dir / "cifar-100-python"
    if all((folder / name).is_file() for name in _FILES):
        return folder
    fetch = fetch_url if fetch is None else fetch
    with download_folder(data_dir):
        fd, tmp_name = tempfile.mkstemp(prefix=".cifar-100-", suffix=".tar.gz", dir=data_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                fetch(url, tmp)
            except OSError as e:  # no network (URLError), HTTP errors, a failing write
                raise DownloadError(
                    f"could not download {url} to {data_dir}: {type(e).__name__}: {e} (without "
                    "a network, unpack cifar-100-python.tar.gz into --data-dir by hand)"
                ) from None
            actual = file_md5(tmp)
            if actual != md5.lower():
                raise UsageError(f"MD5 of {url} is {actual}, expected {md5}")
            with tarfile.open(tmp, "r:gz") as tar:
                tar.extractall(data_dir, members=_safe_members(tar))
        finally:
            tmp.unlink(missing_ok=True)
    return folder


@dataclass
class CIFAR100Data:
    """CIFAR-100 in memory: uint8 CHW images and int64 fine labels."""

    train_images: np.ndarray
    """``[N_train, 3, 32, 32]`` uint8."""
    train_labels: np.ndarray
    """``[N_train]`` int64 in 0..99."""
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def _read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise MissingFileError(
            f"missing CIFAR-100 file {path}; {_FORMAT}. Pass --download to fetch {CIFAR100_URL}"
        )
    try:
        obj = safe_unpickle(path)
    except (EOFError, pickle.UnpicklingError) as e:  # truncated, or holds more than arrays
        raise UsageError(f"{path} is unreadable ({type(e).__name__}: {e}); {_FORMAT}") from e
    if not isinstance(obj, dict) or b"data" not in obj or b"fine_labels" not in obj:
        raise UsageError(f"{path}: {_FORMAT}")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise UsageError(f"{path}: b'data' must be a uint8 array, got {kind}; {_FORMAT}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"{path}: b'data' has shape {data.shape}, expected [N, 3072]; {_FORMAT}")
    labels = np.asarray(obj[b"fine_labels"])
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(
            f"{path}: b'fine_labels' must be {data.shape[0]} integers, got shape {labels.shape} "
            f"dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 99):
        raise UsageError(
            f"{path}: fine labels out of range 0..99 (min {labels.min()}, max {labels.max()})"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar100(
    data_dir: str | os.PathLike[str],
    download: bool = False,
    fetch: Callable[[str, Path], None] | None = None,
) -> CIFAR100Data:
    """Read ``train``, ``test`` and ``meta`` from ``data_dir`` (or ``data_dir/cifar-100-python``).

    :param download: fetch and unpack the canonical archive first if the files are missing.
    :raises FileNotFoundError: a file is missing (the message names its expected path).
    :raises ValueError: a file is malformed (wrong keys, dtype, shape, labels out of range).
    """
    data_dir = Path(data_dir)
    folder = cifar100_folder(data_dir)
    if download and not all((folder / n).is_file() for n in _FILES):
        folder = download_cifar100(data_dir, fetch=fetch)
    train_images, train_labels = _read_split(folder / "train")
    test_images, test_labels = _read_split(folder / "test")
    meta_path = folder / "meta"
    if not meta_path.is_file():
        raise MissingFileError(f"missing CIFAR-100 file {meta_path}; {_FORMAT}")
    meta = safe_unpickle(meta_path)
    if not isinstance(meta, dict) or b"fine_label_names" not in meta:
        raise UsageError(f"{meta_path}: expected a dict with b'fine_label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
    if len(names) != 100:
        raise UsageError(f"{meta_path}: expected 100 fine label names, got {len(names)}")
    return CIFAR100Data(train_images, train_labels, test_images, test_labels, names)


def per_class_split(
    labels: np.ndarray, classes: np.ndarray, counts: tuple[int, ...], what: str
) -> list[np.ndarray]:
    """Consecutive per-class blocks of indices, in file order.

    For ``counts = (c_0, c_1, ...)``, part ``j`` holds, for every class in ``classes`` (in that
    order), the indices of that class's images ``sum(c_<j) .. sum(c_<=j) - 1`` (counted in file
    order). Raises ValueError if a class has fewer than ``sum(counts)`` images.
    """
    need = sum(counts)
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if idx.size < need:
            raise UsageError(
                f"{what}: class {int(c)} has {idx.size} images, need {need} ({' + '.join(map(str, counts))})"
            )
        start = 0
        for j, n in enumerate(counts):
            parts[j].append(idx[start : start + n])
            start += n
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
