"""Loaders of ImageNet 32x32 (both layouts) and CIFAR-100 on small files in the real formats."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from ppo_cbp.datasets import cifar100 as cifar_mod
from ppo_cbp.datasets.cifar100 import (
    RestrictedUnpickler,
    download_cifar100,
    load_cifar100,
    per_class_split,
    safe_unpickle,
)
from ppo_cbp.datasets.imagenet32 import channel_stats, class_pairs, load_imagenet32


def planar_rows(images_chw: np.ndarray) -> np.ndarray:
    """[N, 3, 32, 32] -> [N, 3072] with all red values, then green, then blue (by hand)."""
    n = images_chw.shape[0]
    rows = np.empty((n, 3072), np.uint8)
    for i in range(n):
        for c in range(3):
            for y in range(32):
                rows[i, c * 1024 + y * 32 : c * 1024 + (y + 1) * 32] = images_chw[i, c, y]
    return rows


def coded_images(labels, rng) -> np.ndarray:
    """Images whose pixel (0, c, 0, 0) = label, (0, c, 0, 1) = channel c, rest random."""
    x = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for i, lab in enumerate(labels):
        x[i, :, 0, 0] = lab % 256
        x[i, :, 0, 1] = [10, 20, 30]
        x[i, :, 0, 2] = i % 256
    return x


# ----------------------------------------------------------------------------------------
# ImageNet 32x32, official npz release


def write_official(folder, classes, per_class, rng, val_per_class=0):
    """10 train batches; class k (0-based) images spread over the batches, labels 1-based."""
    labels = np.repeat(np.asarray(classes), per_class)
    rng.shuffle(labels)
    images = coded_images(labels, rng)
    parts = np.array_split(np.arange(len(labels)), 10)
    for b, idx in enumerate(parts, start=1):
        np.savez(
            folder / f"train_data_batch_{b}.npz",
            data=planar_rows(images[idx]),
            labels=labels[idx] + 1,
        )
    if val_per_class:
        vl = np.repeat(np.asarray(classes), val_per_class)
        vi = coded_images(vl, rng)
        np.savez(folder / "val_data.npz", data=planar_rows(vi), labels=vl + 1)
        return images, labels, vi, vl
    return images, labels


def test_official_layout_channel_order_label_base_and_split(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = write_official(tmp_path, [3, 7, 9], per_class=9, rng=rng)
    data = load_imagenet32(tmp_path, train_per_class=5, test_per_class=3)
    assert data.train.shape == (3, 5, 3, 32, 32) and data.test.shape == (3, 3, 3, 32, 32)
    assert data.scale == pytest.approx(1 / 255)
    for k, cls in enumerate([3, 7, 9]):
        # file order: batches 1..10, inside a batch in row order
        idx = np.flatnonzero(labels == cls)
        np.testing.assert_array_equal(data.train[k].numpy(), images[idx[:5]])
        np.testing.assert_array_equal(data.test[k].numpy(), images[idx[5:8]])
        # the label (0-based class id) is where we wrote it; channels are in RGB order
        assert (data.train[k][:, :, 0, 0] == cls).all()
        assert data.train[k][0, :, 0, 1].tolist() == [10, 20, 30]


def test_official_layout_val_test_source(tmp_path):
    rng = np.random.default_rng(1)
    _, _, vi, vl = write_official(tmp_path, [0, 1], per_class=4, rng=rng, val_per_class=3)
    data = load_imagenet32(tmp_path, train_per_class=4, test_per_class=2, test_source="val")
    for k in range(2):
        np.testing.assert_array_equal(data.test[k].numpy(), vi[np.flatnonzero(vl == k)[:2]])


def test_official_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_batch_1"):
        load_imagenet32(tmp_path)
    rng = np.random.default_rng(2)
    write_official(tmp_path, [0, 1], per_class=4, rng=rng)
    with pytest.raises(ValueError, match="class 0 .* has 4 images, need 6"):
        load_imagenet32(tmp_path, train_per_class=4, test_per_class=2)
    np.savez(
        tmp_path / "train_data_batch_3.npz",
        data=np.zeros((2, 3072), np.uint8),
        labels=np.array([0, 1]),
    )
    with pytest.raises(ValueError, match="1-based"):
        load_imagenet32(tmp_path, train_per_class=1, test_per_class=1)
    np.savez(
        tmp_path / "train_data_batch_3.npz",
        data=np.zeros((2, 3072), np.float32),
        labels=np.array([1, 2]),
    )
    with pytest.raises(ValueError, match="float32"):
        load_imagenet32(tmp_path, train_per_class=1, test_per_class=1)
    np.savez(
        tmp_path / "train_data_batch_3.npz",
        data=np.zeros((2, 3000), np.uint8),
        labels=np.array([1, 2]),
    )
    with pytest.raises(ValueError, match="3000"):
        load_imagenet32(tmp_path, train_per_class=1, test_per_class=1)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    write_official(tmp_path, [0, 1], per_class=4, rng=rng)
    obj = np.empty(2, dtype=object)
    np.savez(tmp_path / "train_data_batch_2.npz", data=obj, labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="pickle"):
        load_imagenet32(tmp_path, train_per_class=1, test_per_class=1)


# ----------------------------------------------------------------------------------------
# ImageNet 32x32, per-class .npy layout


def test_per_class_layout_first_train_last_test(tmp_path):
    folder = tmp_path / "classes"
    folder.mkdir()
    rng = np.random.default_rng(4)
    arrays = {}
    for cid in (0, 2, 10):  # sorted by integer id, not by name ("10" < "2" as strings)
        arrays[cid] = coded_images([cid] * 9, rng)
        np.save(folder / f"{cid}.npy", arrays[cid])
    data = load_imagenet32(tmp_path, train_per_class=5, test_per_class=3)
    assert data.train.shape == (3, 5, 3, 32, 32)
    for k, cid in enumerate((0, 2, 10)):
        np.testing.assert_array_equal(data.train[k].numpy(), arrays[cid][:5])
        np.testing.assert_array_equal(data.test[k].numpy(), arrays[cid][6:9])
    mean, std = channel_stats(data.train, data.scale)
    x = np.stack([arrays[c][:5] for c in (0, 2, 10)]).astype(np.float64) / 255
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=(0, 1, 3, 4)), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), x.std(axis=(0, 1, 3, 4)), rtol=1e-10)


def test_per_class_layout_errors(tmp_path):
    np.save(tmp_path / "0.npy", np.zeros((7, 3, 32, 32), np.uint8))
    np.save(tmp_path / "1.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"1\.npy has shape \(7, 32, 32, 3\)"):
        load_imagenet32(tmp_path, train_per_class=5, test_per_class=2)
    np.save(tmp_path / "1.npy", np.full((7, 3, 32, 32), 2.0, np.float32))
    np.save(tmp_path / "0.npy", np.zeros((7, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        load_imagenet32(tmp_path, train_per_class=5, test_per_class=2)
    np.save(tmp_path / "1.npy", np.zeros((7, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="has 7 images, need 8"):
        load_imagenet32(tmp_path, train_per_class=6, test_per_class=2)
    data = load_imagenet32(tmp_path, train_per_class=5, test_per_class=2)
    assert data.scale == 1.0 and data.train.dtype == torch.float32


# ----------------------------------------------------------------------------------------
# Class pairs of Continual ImageNet


@pytest.mark.parametrize("num_classes", [10, 7])
def test_class_pairs_use_every_class_before_reuse(num_classes):
    pairs = class_pairs(seed=5, tasks=40, num_classes=num_classes)
    assert pairs.shape == (40, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    stream = pairs.reshape(-1)
    for p in range(len(stream) // num_classes):
        block = stream[p * num_classes : (p + 1) * num_classes]
        if num_classes % 2 == 0:
            assert sorted(block.tolist()) == list(range(num_classes))
    # each class used the same number of times, up to one, over whole passes
    counts = np.bincount(
        stream[: (len(stream) // num_classes) * num_classes], minlength=num_classes
    )
    assert counts.max() - counts.min() <= 1
    # a pure function of the seed; another seed gives another sequence
    np.testing.assert_array_equal(
        class_pairs(5, 40, num_classes)[:3], class_pairs(5, 3, num_classes)
    )
    assert not np.array_equal(class_pairs(6, 40, num_classes), pairs)


# ----------------------------------------------------------------------------------------
# CIFAR-100


def write_cifar(folder, train_per_class, test_per_class, classes=(0, 1, 2), seed=0):
    """The cifar-100-python structure: pickled dicts with bytes keys, protocol 2."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.asarray(classes), per)
        rng.shuffle(labels)
        images = coded_images(labels, rng)
        d = {
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": b"training batch 1 of 1",
            b"fine_labels": [int(v) for v in labels],
            b"coarse_labels": [int(v) // 5 for v in labels],
            b"data": planar_rows(images),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[name] = (images, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                b"coarse_label_names": [],
            },
            f,
            protocol=2,
        )
    return out


def test_cifar_loader_channel_order_and_split(tmp_path):
    written = write_cifar(tmp_path / "cifar-100-python", train_per_class=8, test_per_class=4)
    data = load_cifar100(tmp_path)
    images, labels = written["train"]
    np.testing.assert_array_equal(data.train_images, images)
    np.testing.assert_array_equal(data.train_labels, labels)
    assert data.train_images[0, :, 0, 1].tolist() == [10, 20, 30]
    assert (data.train_images[:, 0, 0, 0] == labels).all()
    assert data.class_names[:2] == ["c0", "c1"] and len(data.class_names) == 100
    val, train = per_class_split(data.train_labels, np.array([2, 0]), (3, 5), "train")
    # class 2's first 3 images (file order), then class 0's
    expected_val = np.concatenate(
        [np.flatnonzero(labels == 2)[:3], np.flatnonzero(labels == 0)[:3]]
    )
    expected_train = np.concatenate(
        [np.flatnonzero(labels == 2)[3:8], np.flatnonzero(labels == 0)[3:8]]
    )
    np.testing.assert_array_equal(val, expected_val)
    np.testing.assert_array_equal(train, expected_train)
    with pytest.raises(ValueError, match="class 2 has 8 images, need 9"):
        per_class_split(data.train_labels, np.array([2]), (4, 5), "train")


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.*--download"):
        load_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    write_cifar(folder, 2, 1)
    with open(folder / "train", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    bad = {**d, b"fine_labels": [100] + d[b"fine_labels"][1:]}
    with open(folder / "train", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match="out of range 0..99"):
        load_cifar100(tmp_path)
    bad = {**d, b"data": d[b"data"][:, :3000]}
    with open(folder / "train", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match=r"shape \(6, 3000\)"):
        load_cifar100(tmp_path)
    bad = {**d, b"data": d[b"data"].astype(np.float32)}
    with open(folder / "train", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match="uint8"):
        load_cifar100(tmp_path)


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "train"
    with open(path, "wb") as f:
        pickle.dump({b"data": Exploit()}, f, protocol=2)
    with pytest.raises(
        pickle.UnpicklingError, match=r"refusing to load global (__builtin__|builtins)\.print"
    ):
        safe_unpickle(path)
    payload = pickle.dumps(np.dtype("float32"), protocol=2)  # allowed
    assert RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load() == np.float32
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        RestrictedUnpickler(io.BytesIO(b"cos\nsystem\n(S'true'\ntR."), encoding="bytes").load()


def test_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar(src / "cifar-100-python", 2, 1)
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    blob = archive.read_bytes()
    md5 = hashlib.md5(blob).hexdigest()
    calls = []

    def fetch(url, dest):
        calls.append(url)
        dest.write_bytes(blob)

    with pytest.raises(ValueError, match="MD5"):
        download_cifar100(tmp_path / "bad", fetch=fetch)
    assert calls == [cifar_mod.CIFAR100_URL]
    assert not (tmp_path / "bad").exists()  # nothing left behind: the folder it made is removed
    monkeypatch.setattr(cifar_mod, "CIFAR100_MD5", md5)
    data = load_cifar100(tmp_path / "dl", download=True, fetch=fetch)
    assert data.train_images.shape == (6, 3, 32, 32)
    assert (tmp_path / "dl" / "cifar-100-python" / "meta").is_file()
