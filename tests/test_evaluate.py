"""``scripts/evaluate.py``: mean return and its BCa CI over episodes, the dynamics of a run's
segment, several runs as a table, and one ``error:`` line for bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ppo_cbp.envs.dynamics import DynamicsChange
from scipy import stats

from ppo_cbp import load_policy
from ppo_cbp.ppo.environments import make_env
from ppo_cbp.ppo.evaluation import deterministic_policy, evaluate
from ppo_cbp.seeding import TAG_EVAL, derive_seed
from ppo_cbp.train import Args, main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate as script  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = []
    for name, seed in (("a", 1), ("b", 2)):
        args = Args(
            env="Hopper-v4",
            steps=256,
            num_steps=128,
            num_minibatches=2,
            update_epochs=1,
            hidden_sizes=(8,),
            friction_every=100,
            runs_dir=str(root),
            run_name=name,
            progress=False,
            device="cpu",
            seed=seed,
            normalize_obs=name == "b",
        )
        out.append(main(args).run_dir)
    return out


def rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def test_ci_is_the_bca_bootstrap_of_the_episode_returns(runs, monkeypatch, capsys):
    returns = [10.0, 12.5, 7.0, 30.0, 11.0, 9.5]
    monkeypatch.setattr(script, "evaluate_run", lambda *a: list(returns))
    assert script.main([str(runs[0]), "--episodes", "6"]) == 0
    (row,) = rows(capsys.readouterr().out)
    ci = stats.bootstrap(
        (np.array(returns),), np.mean, n_resamples=9_999, rng=np.random.default_rng(0)
    ).confidence_interval
    assert ci.low < np.mean(returns) < ci.high
    assert row[1] == f"{np.mean(returns):.2f}"
    assert row[2] == f"[{ci.low:.2f}, {ci.high:.2f}]"
    assert row[3] == "6" and row[4] == "default"


def test_segment_returns_equal_an_evaluation_by_hand(runs, capsys):
    run = runs[1]
    assert script.main([str(run), str(runs[0]), "--episodes", "2", "--segment", "1"]) == 0
    table = rows(capsys.readouterr().out)
    assert len(table) == 2
    policy = load_policy(run)
    args = policy.settings
    env = make_env(args, 0)()
    inner = env.env
    while not isinstance(inner, DynamicsChange):
        inner = inner.env
    setting = inner.segment_setting(1)
    env.close()
    assert set(setting) == {"friction"}
    assert table[0][4] == f"friction={setting['friction']:.4g}"

    def normalize(o):  # the trainer's normalisation, by hand
        rms = policy.checkpoint["obs_rms"]
        return np.clip((o - rms["mean"].numpy()) / np.sqrt(rms["var"].numpy() + 1e-8), -10, 10)

    act = deterministic_policy(policy.actor, normalize)
    expected = evaluate(act, "Hopper-v4", setting, 2, derive_seed(args.seed, TAG_EVAL) % 2**31)
    assert table[0][1] == f"{np.mean(expected):.2f}"
    assert table[0][3] == "2"


def test_friction_and_seed(runs, capsys):
    assert script.main([str(runs[0]), "--episodes", "2", "--friction", "0.5", "--seed", "4"]) == 0
    (row,) = rows(capsys.readouterr().out)
    act = deterministic_policy(load_policy(runs[0]).actor)
    expected = evaluate(act, "Hopper-v4", {"friction": 0.5}, 2, 4)
    assert row[1] == f"{np.mean(expected):.2f}" and row[4] == "friction=0.5"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{missing}"], "does not exist"),
        (["{run}", "--segment", "99"], "reached segments 0 to"),
        (["{run}", "--segment", "-1"], "reached segments 0 to"),
        (["{run}", "--friction", "0.5", "--segment", "1"], "not allowed with"),
        (["{run}", "--video", "{tmp}/out.avi"], "mp4"),
        (["{run}", "--episodes", "0"], "at least 1"),
        (["{run}", "--friction", "-1"], "positive"),
        (["{run}", "--bogus"], "unrecognized"),
    ],
)
def test_bad_input_is_one_error_line(runs, tmp_path, capsys, argv, message):
    names = dict(missing=str(tmp_path / "nowhere"), run=str(runs[0]), tmp=str(tmp_path))
    before = sorted(p for r in (tmp_path, runs[0]) for p in r.rglob("*"))
    assert script.main([a.format(**names) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert sorted(p for r in (tmp_path, runs[0]) for p in r.rglob("*")) == before


@pytest.mark.slow
def test_video_of_the_first_episode(runs, tmp_path):
    """--video: the first evaluated episode rendered off-screen (OSMesa, in a subprocess so
    that MuJoCo picks its backend) to an mp4 whose frames have the env's render size and
    change over the episode."""
    import os
    import subprocess

    imageio = pytest.importorskip("imageio", reason="the [video] extra is not installed")
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(runs[0])]
    cmd += ["--episodes", "1", "--video", str(out)]
    env = dict(os.environ, MUJOCO_GL="osmesa", PYOPENGL_PLATFORM="osmesa")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 2 and "cannot render off-screen" in proc.stderr:
        pytest.skip(f"no off-screen GL backend here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("video of the first episode of Tuned Adam (")
    assert f": {out}\n" in proc.stdout
    frames = imageio.mimread(out, memtest=False)
    assert len(frames) >= 2 and frames[0].shape == (480, 480, 3)
    assert any((f != frames[0]).any() for f in frames[1:])
