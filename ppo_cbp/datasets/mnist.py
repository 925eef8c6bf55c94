"""MNIST from the four standard gzipped IDX files, and the task stream of Online Permuted MNIST.

Files and checksums
-------------------
The loader reads the four classic files (LeCun, Cortes and Burges) from one folder:

=============================  ================================
file                           MD5 (published, e.g. torchvision)
=============================  ================================
train-images-idx3-ubyte.gz     f68b3c2dcbeaaa9fbdd348bbdeb94873
train-labels-idx1-ubyte.gz     d53e105ee54ea40749a09fcbcd1e9432
t10k-images-idx3-ubyte.gz      9fb629c4189551a2d022fa330f9573f3
t10k-labels-idx1-ubyte.gz      ec29112dd5afa0611ce80d1b7f02629c
=============================  ================================

IDX format: a big-endian header ``0x00 0x00 <dtype code> <ndim>`` (read as one uint32 it is the
magic number: 2051 for the images, ``0x08`` = unsigned byte and 3 dimensions, 2049 for the labels,
1 dimension), then ``ndim`` big-endian uint32 sizes, then the payload in C order.

Online Permuted MNIST (Dohare et al., 2024)
-------------------------------------------
Task ``k`` applies a pixel permutation ``P_k`` of the 784 pixels to every one of the 60,000
training images and shows each image exactly once, in a random order ``O_k``; one task is one pass
(``change_after = 60,000``), 800 tasks in the paper. :func:`permuted_mnist_task` returns
``(P_k, O_k)`` as a pure function of ``(seed, k)``, so a resumed run rebuilds identical tasks
without replaying the earlier ones. The variant that changes the task every 10k, 100k or 1M
examples samples examples with replacement: :func:`example_indices`.

All randomness here comes from NumPy's ``PCG64`` seeded by
``numpy.random.SeedSequence([seed, task, stream])``, using only the raw 64-bit outputs
(``bit_generator.random_raw``), whose stream NumPy guarantees across versions. Permutations are
built on the CPU (a few milliseconds, once per task) and then moved to the device, so the same seed
gives the same tasks on CPU and GPU.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ppo_cbp.datasets.download import DownloadError, download_folder, fetch_url, file_md5
from ppo_cbp.errors import MissingFileError, UsageError
from ppo_cbp.seeding import STREAM_EXAMPLES, STREAM_PIXELS, task_rng

__all__ = [
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNIST_N_PIXELS",
    "default_data_dir",
    "download_mnist",
    "example_indices",
    "load_mnist",
    "permuted_mnist_task",
    "read_idx",
    "task_permutation",
    "verify_mnist_files",
]

MNIST_N_PIXELS = 784
"""Pixels per image (28 x 28)."""

MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""Split name -> (images file, labels file)."""

MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
"""Published MD5 of each original gzipped file."""

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
"""Mirrors tried in order by :func:`download_mnist` (the first is torchvision's)."""

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_DOWNLOAD_HINT = (
    "Download it with `download_mnist(data_dir)` (the `--download` flag of the scripts), "
    "or point `--data-dir` at a folder that holds the four MNIST .gz files."
)

# Stream tags of the seed sequence [seed, task, tag]: independent streams per task.


# --------------------------------------------------------------------------------------------------
# Files


def default_data_dir() -> Path:
    """Folder of the MNIST files (and where they are downloaded to): ``$PPO_CBP_MNIST_DIR`` if
    set, else ``~/.cache/ppo_cbp/mnist``."""
    env = os.environ.get("PPO_CBP_MNIST_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ppo_cbp" / "mnist"


def _check_split(split: str) -> None:
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")


def verify_mnist_files(
    data_dir: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "test"),
    checksums: Mapping[str, str] = MNIST_MD5,
) -> None:
    """Check that the files of ``splits`` exist in ``data_dir`` and match ``checksums``.

    :param data_dir: folder holding the gzipped IDX files.
    :param splits: which splits to check (``"train"``, ``"test"``).
    :param checksums: file name -> expected hex MD5 (default: the published values).
    :raises FileNotFoundError: a file is missing; the message gives its expected full path, its
        expected MD5 and how to get it.
    :raises ValueError: a file's MD5 differs; the message gives the file, expected and actual MD5.
    """
    data_dir = Path(data_dir)
    for split in splits:
        _check_split(split)
        for name in MNIST_FILES[split]:
            _verify_one(data_dir / name, checksums)


def _verify_one(path: Path, checksums: Mapping[str, str]) -> None:
    expected = checksums.get(path.name)
    if expected is None:
        raise ValueError(f"no checksum given for {path.name} (checksums has {sorted(checksums)})")
    if not path.is_file():
        raise MissingFileError(
            f"MNIST file missing: expected {path} (md5 {expected}). {_DOWNLOAD_HINT}"
        )
    actual = file_md5(path)
    if actual != expected.lower():
        raise UsageError(
            f"MNIST file corrupt: {path} has md5 {actual}, expected {expected}. "
            f"Delete it and download it again, or use `--data-dir` to point at a good copy."
        )


def read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Parse one gzipped IDX file of unsigned bytes into a ``uint8`` array.

    :param path: path of the ``.gz`` file.
    :param expected_magic: 2051 for images (3 dims), 2049 for labels (1 dim).
    :return: array of shape given by the header's big-endian dimension sizes.
    :raises ValueError: not gzip, wrong magic number, truncated header, or a payload whose length
        differs from the product of the dimensions; the message names the file.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"{path}: not a readable gzip file ({e})") from e
    if len(raw) < 4:
        raise UsageError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise UsageError(f"{path}: IDX magic number is {magic}, expected {expected_magic}")
    if raw[2] != 0x08:
        raise UsageError(f"{path}: IDX data type code {raw[2]:#04x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise UsageError(f"{path}: IDX header truncated ({len(raw)} bytes, {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n_payload = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header_len != n_payload:
        raise UsageError(
            f"{path}: IDX payload has {len(raw) - header_len} bytes, dimensions {dims} need "
            f"{n_payload}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    checksums: Mapping[str, str] | None = MNIST_MD5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split as flat images and integer labels.

    :param data_dir: folder holding the gzipped IDX files (default: :func:`default_data_dir`).
    :param split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
    :param download: fetch missing or corrupt files first with :func:`download_mnist`.
    :param dtype: floating dtype -> pixels ``x / 255`` in [0, 1] (as torchvision's ``ToTensor``);
        ``torch.uint8`` -> raw pixels 0..255 (4x less memory; scale per minibatch on the device).
    :param device: device of the returned tensors.
    :param checksums: file name -> expected MD5, checked before parsing (default: the published
        values). ``None`` skips the check (synthetic test files).
    :return: ``(images, labels)``: images ``[N, 784]`` in row-major pixel order, labels ``[N]``
        int64 in 0..9.
    """
    _check_split(split)
    if not (dtype == torch.uint8 or dtype.is_floating_point):
        raise ValueError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    if download:
        if checksums is None:
            raise ValueError("download=True needs checksums to verify the downloaded files")
        download_mnist(data_dir, checksums=checksums)
    images_name, labels_name = MNIST_FILES[split]
    images_path, labels_path = data_dir / images_name, data_dir / labels_name
    for path in (images_path, labels_path):
        if checksums is not None:
            _verify_one(path, checksums)
        elif not path.is_file():
            raise MissingFileError(f"MNIST file missing: expected {path}. {_DOWNLOAD_HINT}")

    images = read_idx(images_path, _IMAGES_MAGIC)
    labels = read_idx(labels_path, _LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UsageError(f"{images_path}: images have shape {images.shape}, expected (N, 28, 28)")
    if labels.shape[0] != images.shape[0]:
        raise UsageError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has "
            f"{images.shape[0]} images"
        )
    if labels.size and int(labels.max()) > 9:
        raise UsageError(f"{labels_path}: label {int(labels.max())} outside 0..9")

    x = torch.from_numpy(images.reshape(images.shape[0], MNIST_N_PIXELS).copy()).to(device)
    if dtype != torch.uint8:
        x = x.to(dtype).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y


# --------------------------------------------------------------------------------------------------
# Download


def download_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    checksums: Mapping[str, str] = MNIST_MD5,
    fetch: Callable[[str, Path], None] | None = None,
) -> Path:
    """Download the four MNIST files into ``data_dir``, verifying each MD5.

    A file already present with the right MD5 is skipped. Otherwise each mirror is tried in turn:
    the body goes to a temporary file in ``data_dir``, its MD5 is checked, and only then is it
    renamed onto the final name (``os.replace``, atomic on one file system), so an interrupted or
    corrupt download never leaves a file under the final name.

    :param data_dir: target folder (default: :func:`default_data_dir`); created if needed.
    :param mirrors: base URLs, each ending in ``/``, tried in order.
    :param checksums: file name -> expected MD5 (default: the published values).
    :param fetch: ``fetch(url, dest_path)`` writing the body to ``dest_path``
        (default: :func:`fetch_url`).
    :return: the data folder.
    :raises DownloadError: (a ``UsageError`` and a ``RuntimeError``) every mirror failed for
        some file, the message (one line) lists each attempt; or ``data_dir`` cannot be
        written. The folders it created are removed again then.
    """
    if not mirrors:
        raise ValueError("mirrors is empty")
    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    fetch = fetch_url if fetch is None else fetch
    with download_folder(data_dir):
        _download_files(data_dir, mirrors, checksums, fetch)
    return data_dir


def _download_files(
    data_dir: Path,
    mirrors: Sequence[str],
    checksums: Mapping[str, str],
    fetch: Callable[[str, Path], None],
) -> None:
    for split in ("train", "test"):
        for name in MNIST_FILES[split]:
            if name not in checksums:
                raise ValueError(f"no checksum given for {name}")
            expected = checksums[name].lower()
            final = data_dir / name
            if final.is_file() and file_md5(final) == expected:
                continue
            failures: list[str] = []
            for base in mirrors:
                url = base + name
                fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=data_dir)
                os.close(fd)
                tmp = Path(tmp_name)
                try:
                    fetch(url, tmp)
                    actual = file_md5(tmp)
                    if actual != expected:
                        failures.append(f"{url}: md5 {actual}, expected {expected}")
                        continue
                    os.replace(tmp, final)
                    break
                except Exception as e:  # any failure of one mirror: try the next one
                    failures.append(f"{url}: {type(e).__name__}: {e}")
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                raise DownloadError(
                    f"could not download {name} to {final} (md5 {expected}): "
                    + "; ".join(failures)
                    + " (without a network, copy the MNIST files into --data-dir by hand)"
                )


# --------------------------------------------------------------------------------------------------
# Online Permuted MNIST task stream


def _uniform_permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    # Stable argsort of i.i.d. 64-bit keys is a uniform permutation up to key ties (probability
    # < n^2 / 2^65, about 1e-10 for n = 60,000) and uses only the version-stable raw stream.
    keys = rng.bit_generator.random_raw(n)
    return np.argsort(keys, kind="stable")


def task_permutation(
    rng: np.random.Generator, n_pixels: int = MNIST_N_PIXELS, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A uniformly random permutation of ``n_pixels`` pixel positions (int64 ``[n_pixels]``).

    A permuted image is ``x[..., perm]``: output pixel ``j`` is input pixel ``perm[j]``.
    """
    if n_pixels < 1:
        raise ValueError(f"n_pixels must be >= 1, got {n_pixels}")
    return torch.from_numpy(_uniform_permutation(rng, n_pixels)).to(device)


def permuted_mnist_task(
    seed: int,
    task: int,
    n_examples: int = 60_000,
    n_pixels: int = MNIST_N_PIXELS,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel permutation and example order of task ``task`` of Online Permuted MNIST.

    Task ``k`` shows image ``order[i]`` with pixels ``x[order[i]][perm]`` at step ``i`` of the task,
    for ``i = 0 .. n_examples - 1``: every example exactly once per task.

    ``perm`` is a fresh uniform permutation of the *original* pixels for every task. The official
    code instead permutes the already permuted images, so its task permutations are compositions
    ``P_k o ... o P_1``; the composition of independent uniform permutations is again uniform and
    independent of the earlier tasks', so both give the same distribution over task sequences,
    and ours needs no history to rebuild task ``k``.

    :param seed: run seed (non-negative).
    :param task: task index (non-negative).
    :param n_examples: training examples per task (60,000 for MNIST).
    :param n_pixels: pixels per image (784).
    :param device: device of the returned tensors.
    :return: ``(perm [n_pixels], order [n_examples])``, both int64.
    """
    perm = task_permutation(task_rng(seed, task, STREAM_PIXELS), n_pixels, device)
    order = example_indices(
        seed, task, n_examples, n_examples, with_replacement=False, device=device
    )
    return perm, order


def example_indices(
    seed: int,
    task: int,
    n_examples: int,
    n_data: int,
    with_replacement: bool,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Indices of the training examples shown during one task (int64 ``[n_examples]``).

    - ``with_replacement=True`` (the paper's variant that changes the task every 10k, 100k or 1M
      examples): i.i.d. uniform over ``0 .. n_data - 1``, as ``raw64 mod n_data`` (bias below
      ``n_data / 2^64``).
    - ``with_replacement=False``: successive passes, each a fresh uniform permutation of
      ``0 .. n_data - 1``; the last pass is cut at ``n_examples``. With ``n_examples == n_data``
      this is the example order of :func:`permuted_mnist_task`.

    Pure function of ``(seed, task)``, independent of the pixel permutation's stream.
    """
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")
    rng = task_rng(seed, task, STREAM_EXAMPLES)
    if with_replacement:
        raw = rng.bit_generator.random_raw(n_examples)
        idx = (raw % np.uint64(n_data)).astype(np.int64)
    else:
        n_passes = -(-n_examples // n_data)
        passes = [_uniform_permutation(rng, n_data) for _ in range(n_passes)]
        idx = np.concatenate(passes)[:n_examples] if passes else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(device)
