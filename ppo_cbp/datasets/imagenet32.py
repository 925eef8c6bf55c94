"""ImageNet downsampled to 32x32 (Chrabaszcz, Loshchilov and Hutter, 2017) for Continual ImageNet.

Two layouts are read, both with ``allow_pickle=False`` (no pickled objects are ever executed):

* **official** ("Downsampled ImageNet 32x32" release): ``train_data_batch_1.npz`` ..
  ``train_data_batch_10.npz`` and ``val_data.npz``, each with ``data`` (uint8 ``[N, 3072]``,
  channel-planar: 1024 red, 1024 green, 1024 blue values, so ``row.reshape(3, 32, 32)`` is
  CHW) and ``labels`` (N ints, **1-based**, 1..1000). Class ``k`` here is label ``k + 1``.
  Per class, the first ``train + test`` (600 + 100) training images in file order are kept:
  the first 600 train, the next 100 test, the split of the paper's per-class files. With
  ``test_source="val"`` the test images are instead the first ``test`` images of that class
  in ``val_data.npz`` (the release has 50 per class).
* **per-class** (the paper's code): one ``<class_id>.npy`` per class in ``data_dir/classes/``
  (or ``data_dir``), each ``[700, 3, 32, 32]``: the first 600 images train, the last 100 test.
  Class ``k`` is the ``k``-th file in increasing integer ``class_id``. uint8 files are scaled
  by 1/255; floating files must already lie in [0, 1].

Pixels are in [0, 1]; :func:`channel_stats` gives the per-channel mean and standard deviation
over all training images (the normalisation of the benchmark).

Task schedule
-------------
:func:`class_pairs` draws each run's sequence of class pairs: the classes are visited in
successive uniformly random permutations (one per pass over all classes, drawn from the run
seed), and task ``t`` is the pair at positions ``2t, 2t + 1`` of that stream, labelled 0 and 1.
No class is used twice before all have been used. When a pass has an odd number of classes
its last class is paired with the first of the next pass; if that is the same class, the
second member is swapped with the next element of the new pass.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ppo_cbp.errors import MissingFileError, UsageError
from ppo_cbp.seeding import STREAM_CLASS_PAIRS, task_rng

__all__ = [
    "IMAGENET32_TRAIN_FILES",
    "ImageNet32Data",
    "channel_stats",
    "class_pairs",
    "detect_layout",
    "load_imagenet32",
]

IMAGENET32_TRAIN_FILES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
_VAL_FILE = "val_data.npz"
_OFFICIAL_FORMAT = (
    "expected the Downsampled ImageNet 32x32 files train_data_batch_1..10.npz (and val_data.npz) "
    "with 'data' uint8 [N, 3072] channel-planar and 'labels' 1-based in 1..1000"
)
_PER_CLASS_FORMAT = (
    "expected one <class_id>.npy per class, shaped [700, 3, 32, 32], uint8 or float in [0, 1]"
)


@dataclass
class ImageNet32Data:
    """Per-class images: ``train[k]`` and ``test[k]`` are class ``k``'s images ``[n, 3, 32, 32]``.

    Stored uint8 (values ``/ 255`` are the pixels) or float32 in [0, 1] (``scale`` 1).
    """

    train: torch.Tensor
    """``[K, n_train, 3, 32, 32]``."""
    test: torch.Tensor
    """``[K, n_test, 3, 32, 32]``."""
    scale: float
    """Multiply by this to get pixels in [0, 1]."""

    @property
    def num_classes(self) -> int:
        return self.train.shape[0]


def detect_layout(data_dir: Path) -> Literal["official", "per-class"]:
    if (data_dir / IMAGENET32_TRAIN_FILES[0]).is_file():
        return "official"
    if _per_class_folder(data_dir) is not None:
        return "per-class"
    raise MissingFileError(
        f"no ImageNet 32x32 data in {data_dir}: {_OFFICIAL_FORMAT}; or {data_dir}/classes/ "
        f"with {_PER_CLASS_FORMAT}"
    )


def _per_class_folder(data_dir: Path) -> Path | None:
    for folder in (data_dir / "classes", data_dir):
        if folder.is_dir() and any(re.fullmatch(r"\d+\.npy", p.name) for p in folder.iterdir()):
            return folder
    return None


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise MissingFileError(f"missing {path}; {_OFFICIAL_FORMAT}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "data" not in f.files or "labels" not in f.files:
                raise UsageError(f"{path} has keys {f.files}; {_OFFICIAL_FORMAT}")
            data, labels = f["data"], np.asarray(f["labels"])
    except UsageError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # truncated, not an npz
        raise UsageError(
            f"{path} is unreadable ({type(e).__name__}: {e}); {_OFFICIAL_FORMAT}"
        ) from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"{path}: 'data' is {data.dtype} {data.shape}; {_OFFICIAL_FORMAT}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"{path}: 'labels' is {labels.dtype} {labels.shape}; {_OFFICIAL_FORMAT}")
    if labels.size and (labels.min() < 1 or labels.max() > 1000):
        raise UsageError(
            f"{path}: labels out of range 1..1000 (min {labels.min()}, max {labels.max()}); "
            "the official labels are 1-based"
        )
    return data, labels.astype(np.int64) - 1


def _take_per_class(
    files: list[Path], need: int, what: str
) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Per class the first ``need`` images over ``files`` in order; and the class ids seen."""
    kept: list[list[np.ndarray]] = [[] for _ in range(1000)]
    count = np.zeros(1000, np.int64)
    for path in files:
        data, labels = _npz_arrays(path)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(1001))
        for k in np.flatnonzero(bounds[1:] > bounds[:-1]):
            if count[k] >= need:
                continue
            idx = order[bounds[k] : bounds[k + 1]][: need - count[k]]
            kept[k].append(data[idx])
            count[k] += idx.size
    present = np.flatnonzero(count > 0)
    short = [int(k) for k in present if count[k] < need]
    if short:
        k = short[0]
        raise UsageError(
            f"{what}: class {k} (label {k + 1}) has {count[k]} images, need {need} "
            f"({len(short)} classes short)"
        )
    return kept, present


def _load_official(
    data_dir: Path, n_train: int, n_test: int, test_source: str
) -> tuple[np.ndarray, np.ndarray]:
    files = [data_dir / name for name in IMAGENET32_TRAIN_FILES]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise MissingFileError(
            f"{data_dir} lacks {len(missing)} of the 10 training batches: {', '.join(missing)} "
            f"(expected in {data_dir}/); {_OFFICIAL_FORMAT}"
        )
    if test_source == "train":
        kept, present = _take_per_class(files, n_train + n_test, "training batches")
        both = np.stack([np.concatenate(kept[k]) for k in present]).reshape(
            -1, n_train + n_test, 3, 32, 32
        )
        return both[:, :n_train], both[:, n_train:]
    kept, present = _take_per_class(files, n_train, "training batches")
    kept_val, present_val = _take_per_class(
        [data_dir / _VAL_FILE], n_test, str(data_dir / _VAL_FILE)
    )
    if not np.array_equal(present, present_val):
        raise UsageError(
            f"{data_dir / _VAL_FILE} does not hold the classes of the training batches"
        )
    train = np.stack([np.concatenate(kept[k]) for k in present]).reshape(-1, n_train, 3, 32, 32)
    test = np.stack([np.concatenate(kept_val[k]) for k in present]).reshape(-1, n_test, 3, 32, 32)
    return train, test


def _load_per_class(
    folder: Path, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, float]:
    files = sorted(
        (p for p in folder.iterdir() if re.fullmatch(r"\d+\.npy", p.name)),
        key=lambda p: int(p.stem),
    )
    trains, tests, scale, dtype = [], [], 1.0, None
    for path in files:
        a = np.load(path, allow_pickle=False, mmap_mode="r")
        if a.ndim != 4 or a.shape[1:] != (3, 32, 32):
            raise UsageError(f"{path} has shape {a.shape}; {_PER_CLASS_FORMAT}")
        if a.shape[0] < n_train + n_test:
            raise UsageError(
                f"{path} has {a.shape[0]} images, need {n_train + n_test} ({n_train} train + {n_test} test)"
            )
        if dtype is None:
            dtype = a.dtype
        if a.dtype != dtype:
            raise UsageError(f"{path} is {a.dtype} but the first class file is {dtype}")
        if a.dtype == np.uint8:
            scale = 1.0 / 255.0
        elif np.issubdtype(a.dtype, np.floating):
            lo, hi = float(np.min(a)), float(np.max(a))
            if lo < 0 or hi > 1:
                raise UsageError(
                    f"{path}: float pixels in [{lo}, {hi}], expected [0, 1] (or store uint8 0..255)"
                )
        else:
            raise UsageError(f"{path} has dtype {a.dtype}; {_PER_CLASS_FORMAT}")
        # the paper's files: the first 600 images train, the last 100 test
        trains.append(np.asarray(a[:n_train]))
        tests.append(np.asarray(a[a.shape[0] - n_test :]))
    out_dtype = np.uint8 if dtype == np.uint8 else np.float32
    return np.stack(trains).astype(out_dtype), np.stack(tests).astype(out_dtype), scale


def load_imagenet32(
    data_dir: str | os.PathLike[str],
    train_per_class: int = 600,
    test_per_class: int = 100,
    layout: Literal["auto", "official", "per-class"] = "auto",
    test_source: Literal["train", "val"] = "train",
) -> ImageNet32Data:
    """Read ImageNet 32x32 in either layout (see the module docstring).

    :param train_per_class: training images per class (600 in the paper).
    :param test_per_class: test images per class (100 in the paper).
    :raises FileNotFoundError: no data in the expected files (the message names them).
    :raises ValueError: malformed files, labels out of range, or too few images per class.
    """
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            f"train_per_class and test_per_class must be >= 1, got {train_per_class}, {test_per_class}"
        )
    if test_source not in ("train", "val"):
        raise ValueError(f"test_source must be 'train' or 'val', got {test_source!r}")
    data_dir = Path(data_dir)
    if layout == "auto":
        layout = detect_layout(data_dir)
    if layout == "official":
        train, test = _load_official(data_dir, train_per_class, test_per_class, test_source)
        scale = 1.0 / 255.0
    elif layout == "per-class":
        folder = _per_class_folder(data_dir)
        if folder is None:
            raise MissingFileError(f"no <class_id>.npy files in {data_dir}/classes or {data_dir}")
        train, test, scale = _load_per_class(folder, train_per_class, test_per_class)
    else:
        raise ValueError(f"layout must be auto, official or per-class, got {layout!r}")
    if train.shape[0] < 2:
        raise UsageError(f"{data_dir}: need at least 2 classes, found {train.shape[0]}")
    return ImageNet32Data(torch.from_numpy(train), torch.from_numpy(test), scale)


def channel_stats(images: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of ``images * scale``, in float64.

    ``images`` is ``[..., 3, H, W]``; the statistics run over every image and pixel.
    """
    x = images.reshape(-1, *images.shape[-3:])
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in x.split(8192):
        c = chunk.to(torch.float64) * scale
        total += c.sum(dim=(0, 2, 3))
        total_sq += (c * c).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[-1] * x.shape[-2]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    return mean, std


def class_pairs(seed: int, tasks: int, num_classes: int) -> np.ndarray:
    """The run's class pairs ``[tasks, 2]`` (int64), see the module docstring.

    Pass ``p`` over the classes is the permutation ``argsort`` of i.i.d. 64-bit raw outputs
    of ``PCG64(SeedSequence([seed, p, 7]))``: a pure function of ``(seed, p)``, stable across
    NumPy versions.
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if tasks < 0:
        raise ValueError(f"tasks must be >= 0, got {tasks}")
    stream: list[int] = []
    p = 0
    while len(stream) < 2 * tasks:
        keys = task_rng(seed, p, STREAM_CLASS_PAIRS).bit_generator.random_raw(num_classes)
        perm = np.argsort(keys, kind="stable").tolist()
        if len(stream) % 2 == 1 and perm[0] == stream[-1]:
            perm[0], perm[1] = perm[1], perm[0]
        stream.extend(perm)
        p += 1
    return np.asarray(stream[: 2 * tasks], dtype=np.int64).reshape(tasks, 2)
