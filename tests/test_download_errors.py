"""``--download`` without a network or into a folder that cannot be written: one ``error:``
line (exit 2), no traceback, and no data folder left behind."""

from __future__ import annotations

import importlib.util
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ppo_cbp.datasets import cifar100, mnist
from ppo_cbp.datasets.download import DownloadError

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "supervised_script", ROOT / "scripts" / "supervised.py"
)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def one_line(code: int, err: str, *needles: str) -> str:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_permuted_mnist_download_without_a_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    data = tmp_path / "data" / "mnist"
    argv = ["permuted-mnist", "--data-dir", data, "--download", "--out", tmp_path / "out"]
    code, out, err = run([*argv, "--device", "cpu", "--no-progress"], capsys)
    one_line(code, err, "could not download", "URLError", "name resolution", "by hand")
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data folder, no run folder


def test_download_into_a_folder_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # never reached
    blocker = tmp_path / "file"
    blocker.write_text("")
    for data, needle in (
        (Path("/proc/x/mnist"), "--data-dir /proc/x/mnist cannot be written"),
        (blocker / "mnist", f"--data-dir {blocker / 'mnist'} cannot be created"),
    ):
        argv = ["permuted-mnist", "--data-dir", data, "--download", "--out", tmp_path / "out"]
        code, _, err = run([*argv, "--device", "cpu", "--no-progress"], capsys)
        one_line(code, err, needle)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert not Path("/proc/x").exists()


def test_library_calls_raise_one_line_download_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DownloadError) as info:
        mnist.download_mnist(tmp_path / "m", mirrors=["https://a.example/"])
    assert "\n" not in str(info.value) and isinstance(info.value, RuntimeError)
    with pytest.raises(DownloadError, match="URLError"):
        cifar100.download_cifar100(tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
