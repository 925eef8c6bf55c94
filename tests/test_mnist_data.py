"""MNIST IDX loader, checksums, download and the Online Permuted MNIST task stream."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_cbp.datasets import mnist
from ppo_cbp.datasets.mnist import (
    MNIST_MD5,
    default_data_dir,
    download_mnist,
    example_indices,
    load_mnist,
    permuted_mnist_task,
    task_permutation,
    verify_mnist_files,
)
from ppo_cbp.seeding import task_rng

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def _real_mnist_dir() -> Path:
    env = os.environ.get("PPO_CBP_MNIST_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared/data/mnist"


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    # Header written by hand from the IDX spec: big-endian magic, then big-endian uint32 dims.
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def synthetic(tmp_path: Path) -> dict:
    """Small synthetic MNIST: 7 train and 3 test images with known pixels and labels."""
    rng = np.random.default_rng(0)
    data = {
        "train": (rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)),
        "test": (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)),
    }
    data["train"][0][0, 0, 0] = 255  # both ends of the pixel range present
    data["train"][0][0, 0, 1] = 0
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    checksums = {}
    for split, (images, labels) in data.items():
        img_name, lab_name = names[split]
        _write_idx(tmp_path / img_name, 2051, images)
        _write_idx(tmp_path / lab_name, 2049, labels)
        checksums[img_name] = _md5(tmp_path / img_name)
        checksums[lab_name] = _md5(tmp_path / lab_name)
    return {"dir": tmp_path, "data": data, "checksums": checksums, "names": names}


# --------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("device", DEVICES)
def test_load_parses_pixels_and_labels(synthetic, split, device):
    images, labels = synthetic["data"][split]
    x, y = load_mnist(synthetic["dir"], split, checksums=synthetic["checksums"], device=device)
    n = images.shape[0]
    assert x.shape == (n, 784) and x.dtype == torch.float32 and x.device.type == device
    assert y.shape == (n,) and y.dtype == torch.int64
    expected = images.reshape(n, 784).astype(np.float64) / 255.0
    np.testing.assert_allclose(x.cpu().double().numpy(), expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y.cpu().numpy(), labels)
    # Row-major flattening: pixel (row r, column c) is feature 28 r + c.
    assert x[0, 28 * 3 + 5].item() == pytest.approx(images[0, 3, 5] / 255.0, abs=1e-7)


def test_load_pixel_range_and_uint8(synthetic):
    d, sums = synthetic["dir"], synthetic["checksums"]
    x, _ = load_mnist(d, "train", checksums=sums)
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    raw, _ = load_mnist(d, "train", checksums=sums, dtype=torch.uint8)
    assert raw.dtype == torch.uint8
    images = synthetic["data"]["train"][0]
    np.testing.assert_array_equal(raw.numpy(), images.reshape(-1, 784))
    x64, _ = load_mnist(d, "train", checksums=sums, dtype=torch.float64)
    assert torch.equal(x64, raw.double() / 255.0)


def test_wrong_magic_names_file(synthetic):
    d = synthetic["dir"]
    path = d / "train-images-idx3-ubyte.gz"
    _write_idx(path, 2049, synthetic["data"]["train"][0])  # label magic on an image file
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte\.gz.*magic number is 2049.*2051"
    ):
        load_mnist(d, "train", checksums=None)


def test_truncated_payload_names_file(synthetic):
    d = synthetic["dir"]
    path = d / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 2049, 5) + bytes([1, 2, 3]))  # says 5 labels, holds 3
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*3 bytes.*need 5"):
        load_mnist(d, "test", checksums=None)


def test_not_gzip_names_file(synthetic):
    d = synthetic["dir"]
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*gzip"):
        load_mnist(d, "test", checksums=None)


def test_label_count_mismatch(synthetic):
    d = synthetic["dir"]
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(2))
    with pytest.raises(ValueError, match=r"2 labels.*3 images"):
        load_mnist(d, "test", checksums=None)


def test_bad_split_and_dtype(synthetic):
    with pytest.raises(ValueError, match="split"):
        load_mnist(synthetic["dir"], "validation", checksums=None)
    with pytest.raises(ValueError, match="dtype"):
        load_mnist(synthetic["dir"], "train", checksums=None, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# Checksums


def test_missing_file_reports_path_checksum_and_hint(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path, "train")
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message
    assert "--download" in message and "--data-dir" in message


def test_md5_mismatch_reports_expected_and_actual(synthetic):
    d = synthetic["dir"]
    images = d / "train-images-idx3-ubyte.gz"
    with pytest.raises(ValueError) as info:
        load_mnist(d, "train")  # published checksums: the synthetic files cannot match
    message = str(info.value)
    assert str(images) in message and _md5(images) in message
    assert MNIST_MD5["train-images-idx3-ubyte.gz"] in message
    path = d / "train-labels-idx1-ubyte.gz"
    actual = _md5(path)
    sums = dict(synthetic["checksums"], **{"train-labels-idx1-ubyte.gz": "0" * 32})
    with pytest.raises(ValueError) as info:
        verify_mnist_files(d, ["train"], checksums=sums)
    message = str(info.value)
    assert str(path) in message and actual in message and "0" * 32 in message


def test_verify_passes_with_matching_table(synthetic):
    verify_mnist_files(synthetic["dir"], checksums=synthetic["checksums"])


# --------------------------------------------------------------------------------------------------
# Download (no network: the fetch function is replaced)


def _file_bytes(synthetic) -> dict[str, bytes]:
    return {name: (synthetic["dir"] / name).read_bytes() for name in synthetic["checksums"]}


def test_download_skips_valid_files(synthetic, monkeypatch):
    calls = []
    monkeypatch.setattr(mnist, "fetch_url", lambda url, dest: calls.append(url))
    download_mnist(synthetic["dir"], checksums=synthetic["checksums"])
    assert calls == []


def test_download_fetches_missing_and_corrupt_files(synthetic, tmp_path, monkeypatch):
    blobs = _file_bytes(synthetic)
    target = tmp_path / "new"
    target.mkdir()
    (target / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupt")
    (target / "train-labels-idx1-ubyte.gz").write_bytes(blobs["train-labels-idx1-ubyte.gz"])
    calls = []

    def fake_fetch(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(mnist, "fetch_url", fake_fetch)
    download_mnist(target, mirrors=["https://a.example/"], checksums=synthetic["checksums"])
    # Three files fetched (the valid train labels skipped), all from the first mirror.
    assert sorted(calls) == sorted(
        "https://a.example/" + n for n in blobs if n != "train-labels-idx1-ubyte.gz"
    )
    for name, blob in blobs.items():
        assert (target / name).read_bytes() == blob
    assert sorted(p.name for p in target.iterdir()) == sorted(blobs)  # no temp files left
    x, y = load_mnist(target, "test", checksums=synthetic["checksums"])
    assert x.shape == (3, 784) and y.shape == (3,)


def test_download_falls_back_to_next_mirror(synthetic, tmp_path):
    blobs = _file_bytes(synthetic)
    target = tmp_path / "new"
    calls = []

    def fetch(url: str, dest: Path) -> None:
        calls.append(url)
        if url.startswith("https://bad.example/"):
            dest.write_bytes(b"an error page")  # wrong MD5
        else:
            dest.write_bytes(blobs[url.rsplit("/", 1)[1]])

    mirrors = ["https://bad.example/", "https://good.example/"]
    download_mnist(target, mirrors=mirrors, checksums=synthetic["checksums"], fetch=fetch)
    assert len(calls) == 8
    for name, blob in blobs.items():
        assert (target / name).read_bytes() == blob


def test_download_failure_reports_every_mirror(synthetic, tmp_path):
    target = tmp_path / "new"

    def fetch(url: str, dest: Path) -> None:
        if url.startswith("https://a.example/"):
            raise OSError("connection refused")
        dest.write_bytes(b"truncated")

    with pytest.raises(RuntimeError) as info:
        download_mnist(
            target,
            mirrors=["https://a.example/", "https://b.example/"],
            checksums=synthetic["checksums"],
            fetch=fetch,
        )
    message = str(info.value)
    first = "train-images-idx3-ubyte.gz"
    assert f"https://a.example/{first}" in message and "connection refused" in message
    bad_md5 = hashlib.md5(b"truncated").hexdigest()
    assert f"https://b.example/{first}" in message and bad_md5 in message
    assert synthetic["checksums"][first] in message
    assert not target.exists()  # nothing half-written under any name, nor the folder


def test_load_with_download_flag(synthetic, tmp_path, monkeypatch):
    blobs = _file_bytes(synthetic)
    monkeypatch.setattr(
        mnist, "fetch_url", lambda url, dest: dest.write_bytes(blobs[url.rsplit("/", 1)[1]])
    )
    x, y = load_mnist(tmp_path / "fresh", "train", download=True, checksums=synthetic["checksums"])
    images, labels = synthetic["data"]["train"]
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert x.shape == (images.shape[0], 784)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PPO_CBP_MNIST_DIR", str(tmp_path / "data"))
    assert default_data_dir() == tmp_path / "data"
    monkeypatch.delenv("PPO_CBP_MNIST_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "ppo_cbp" / "mnist"


# --------------------------------------------------------------------------------------------------
# Online Permuted MNIST task stream


@pytest.mark.parametrize("device", DEVICES)
def test_task_permutation_and_order_are_bijections(device):
    perm, order = permuted_mnist_task(seed=3, task=11, device=device)
    assert perm.dtype == torch.int64 and perm.device.type == device
    assert torch.equal(perm.sort().values.cpu(), torch.arange(784))
    assert torch.equal(order.sort().values.cpu(), torch.arange(60_000))  # each example once
    assert not torch.equal(perm.cpu(), torch.arange(784))


def test_tasks_are_reproducible_and_distinct():
    perm_a, order_a = permuted_mnist_task(seed=0, task=5)
    # Task 5 rebuilt after other tasks were drawn (as after a resume) is identical.
    for task in range(5):
        permuted_mnist_task(seed=0, task=task)
    perm_b, order_b = permuted_mnist_task(seed=0, task=5)
    assert torch.equal(perm_a, perm_b) and torch.equal(order_a, order_b)
    perm_c, order_c = permuted_mnist_task(seed=0, task=6)
    perm_d, order_d = permuted_mnist_task(seed=1, task=5)
    for other in (perm_c, perm_d):
        assert (other != perm_a).sum() > 700  # a random permutation keeps ~1 pixel in place
    for other in (order_c, order_d):
        assert (other != order_a).sum() > 59_000


def test_permutation_is_uniform():
    # All 24 permutations of 4 elements over 2400 tasks: chi-square with 23 degrees of freedom.
    counts: dict[tuple[int, ...], int] = {}
    for task in range(2400):
        p = tuple(task_permutation(task_rng(7, task, 0), n_pixels=4).tolist())
        counts[p] = counts.get(p, 0) + 1
    assert len(counts) == math.factorial(4)
    expected = 2400 / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 49.7  # 0.1 % upper quantile of chi-square(23)


@pytest.mark.parametrize("device", DEVICES)
def test_example_indices_with_replacement(device):
    idx = example_indices(
        seed=2, task=4, n_examples=100_000, n_data=10, with_replacement=True, device=device
    )
    assert idx.shape == (100_000,) and idx.dtype == torch.int64 and idx.device.type == device
    assert idx.min().item() >= 0 and idx.max().item() <= 9
    counts = torch.bincount(idx.cpu(), minlength=10)
    assert ((counts - 10_000).abs() < 500).all()  # sd = 95 per count
    again = example_indices(2, 4, 100_000, 10, with_replacement=True, device=device)
    assert torch.equal(idx, again)
    other = example_indices(2, 5, 100_000, 10, with_replacement=True, device=device)
    assert not torch.equal(idx, other)
    # Drawn with replacement from 60,000 images: repeats appear (expected ~ 3,000 in 20,000).
    big = example_indices(2, 4, 20_000, 60_000, with_replacement=True)
    assert big.unique().numel() < 19_000


def test_example_indices_without_replacement_passes():
    idx = example_indices(seed=1, task=0, n_examples=25, n_data=10, with_replacement=False)
    for k in range(2):
        assert torch.equal(idx[10 * k : 10 * (k + 1)].sort().values, torch.arange(10))
    assert idx[20:].unique().numel() == 5
    assert not torch.equal(idx[:10], idx[10:20])  # each pass is reshuffled
    _, order = permuted_mnist_task(seed=1, task=0, n_examples=10)
    assert torch.equal(order, idx[:10])


def test_task_stream_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        permuted_mnist_task(seed=-1, task=0)
    with pytest.raises(ValueError, match="task"):
        permuted_mnist_task(seed=0, task=-2)
    with pytest.raises(ValueError, match="n_data"):
        example_indices(0, 0, 10, 0, with_replacement=True)


# --------------------------------------------------------------------------------------------------
# Real MNIST (skipped where the files are not available)


@pytest.mark.skipif(not _real_mnist_dir().is_dir(), reason="real MNIST files not available")
def test_real_mnist():
    d = _real_mnist_dir()
    verify_mnist_files(d)  # published MD5s
    x, y = load_mnist(d, "train")
    assert x.shape == (60_000, 784) and x.dtype == torch.float32
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    hist = torch.bincount(y, minlength=10)
    assert hist.sum().item() == 60_000
    # Label histogram and first labels as documented for the original files.
    assert hist.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert y[:20].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7, 2, 8, 6, 9]
    assert x.double().mean().item() == pytest.approx(33.318 / 255, abs=1e-4)
    x_test, y_test = load_mnist(d, "test")
    assert x_test.shape == (10_000, 784) and y_test.shape == (10_000,)
    assert torch.bincount(y_test, minlength=10).sum().item() == 10_000
    assert y_test[:20].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]
