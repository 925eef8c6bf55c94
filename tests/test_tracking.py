"""--track (W&B) and --capture-video: what W&B gets is what TensorBoard gets, a resumed run
continues its W&B run, missing extras are one error line, and videos change no training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ppo_cbp import tracking
from ppo_cbp.errors import UsageError
from ppo_cbp.train import main
from tests.test_train import assert_same_state, deterministic, load, scalars, small

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "ppo_cbp" / "train.py"


class FakeRun:
    def __init__(self, **kw):
        self.init, self.logged, self.finished = kw, [], False

    def log(self, data):
        self.logged.append(dict(data))

    def define_metric(self, *a, **kw):
        pass

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A wandb module that records its runs."""
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kw):
        module.runs.append(FakeRun(**kw))
        return module.runs[-1]

    module.init = init
    module.Video = lambda path, **kw: ("video", path)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def logged_scalars(run: FakeRun) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for entry in run.logged:
        step = entry.pop("global_step")
        for tag, value in entry.items():
            out.setdefault(tag, []).append((step, value))
    return out


def test_wandb_gets_what_tensorboard_gets_and_resume_continues_the_run(tmp_path, fake_wandb):
    main(small(tmp_path, env="Hopper-v4", steps=512, track=True, wandb_entity="lab"))
    run_dir = tmp_path / "run"
    (run,) = fake_wandb.runs
    run_id = (run_dir / tracking.ID_FILE).read_text().strip()
    assert run.init["name"] == "run" and run.init["id"] == run_id
    assert run.init["resume"] == "allow"
    assert run.init["project"] == "ppo_cbp" and run.init["entity"] == "lab"
    config = json.loads((run_dir / "config.json").read_text())
    assert run.init["config"] == {k: v for k, v in config.items() if k != "provenance"}
    assert run.finished
    board, sent = scalars(run_dir), logged_scalars(run)
    assert sorted(sent) == sorted(board)
    for tag, points in board.items():
        assert [s for s, _ in sent[tag]] == [s for s, _ in points], tag
        np.testing.assert_array_equal(
            np.float32([v for _, v in sent[tag]]), np.float32([v for _, v in points]), tag
        )
    main(small(tmp_path, env="Hopper-v4", steps=1024, resume=str(run_dir), track=True))
    assert fake_wandb.runs[1].init["id"] == run_id
    assert min(s for s, _ in logged_scalars(fake_wandb.runs[1])["charts/learning_rate"]) > 512


def test_track_without_wandb_is_one_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UsageError, match=r"pip install -e '\.\[wandb\]'"):
        main(small(tmp_path, track=True))
    assert not (tmp_path / "run").exists()


def test_capture_video_without_encoder_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio", None)
    with pytest.raises(UsageError, match=r"pip install -e '\.\[video\]'"):
        main(small(tmp_path, capture_video=True))
    assert not (tmp_path / "run").exists()


def gl_backend() -> str | None:
    """The first of osmesa, egl with which MuJoCo renders here (in a new process: the
    backend is chosen when MuJoCo's GL is first loaded)."""
    probe = "from ppo_cbp.ppo.video import check_rendering; check_rendering('Hopper-v4')"
    for gl in ("osmesa", "egl"):
        env = dict(os.environ, MUJOCO_GL=gl, PYOPENGL_PLATFORM=gl)
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
        if done.returncode == 0:
            return gl
    return None


@pytest.mark.slow
def test_videos_change_no_training_and_show_the_episode(tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="the [video] extra is not installed")
    gl = gl_backend()
    if gl is None:
        pytest.skip("no off-screen GL backend (MUJOCO_GL=osmesa or egl) can be created here")
    import imageio.v3 as iio

    common = ["--env", "Hopper-v4", "--steps", "1024", "--num-steps", "256"]
    common += ["--num-minibatches", "4", "--update-epochs", "2", "--metrics-every", "2"]
    common += ["--no-progress", "--device", "cpu", "--threads", "1", "--runs-dir", str(tmp_path)]
    env = dict(os.environ, MUJOCO_GL=gl, PYOPENGL_PLATFORM=gl)
    for name, extra in (("plain", []), ("video", ["--capture-video", "--video-every", "512"])):
        cmd = [sys.executable, str(TRAIN), *common, "--run-name", name, *extra]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert_same_state(load(tmp_path / "plain"), load(tmp_path / "video"))
    assert deterministic(scalars(tmp_path / "plain")) == deterministic(scalars(tmp_path / "video"))
    videos = sorted(p.name for p in (tmp_path / "video" / "videos").iterdir())
    assert videos == ["0.mp4", "512.mp4"]
    frames = iio.imread(tmp_path / "video" / "videos" / "0.mp4")
    assert frames.shape[1:] == (480, 480, 3)  # Hopper's render size
    assert len(frames) > 2 and np.abs(frames[-1].astype(int) - frames[0]).mean() > 1


@pytest.mark.slow
def test_real_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    main(small(tmp_path, env="Hopper-v4", steps=512, track=True))
    run_id = (tmp_path / "run" / tracking.ID_FILE).read_text().strip()
    assert list((tmp_path / "wandb").rglob(f"*{run_id}*"))


def test_supervised_track_sends_each_seed_under_its_prefix(tmp_path, fake_wandb):
    from ppo_cbp.benchmarks import registry

    out = tmp_path / "scr"
    argv = ["slowly-changing-regression", "--examples", "400", "--bin-size", "200"]
    argv += ["--seeds", "0", "1", "--out", str(out), "--no-progress", "--device", "cpu"]
    cfg = registry.parse([*argv, "--track"])
    registry.RUNS[type(cfg)](cfg)
    (run,) = fake_wandb.runs
    assert run.init["name"] == "scr" and run.finished
    sent = logged_scalars(run)
    for seed in (0, 1):
        board = scalars(out / f"seed_{seed}" / "tb")
        assert {
            t.removeprefix(f"seed_{seed}/") for t in sent if t.startswith(f"seed_{seed}/")
        } == set(board)
        for tag, points in board.items():
            got = sent[f"seed_{seed}/{tag}"]
            assert [s for s, _ in got] == [s for s, _ in points]
            np.testing.assert_array_equal(
                np.float32([v for _, v in got]), np.float32([v for _, v in points])
            )


def test_supervised_track_without_wandb_is_one_error(tmp_path, monkeypatch):
    from ppo_cbp.benchmarks import registry

    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = registry.parse(["slowly-changing-regression", "--out", str(tmp_path / "o"), "--track"])
    with pytest.raises(UsageError, match=r"pip install -e '\.\[wandb\]'"):
        registry.RUNS[type(cfg)](cfg)
    assert not (tmp_path / "o").exists()
