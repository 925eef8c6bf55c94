"""The trainer's env changes: settings checks (one error line, nothing written), the released
table in env 0, evaluation, and end-to-end runs (slow) with every change on every body, exact
resume in the middle of a segment and of a drift, and training unchanged by evaluation."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ppo_cbp.envs.dynamics import SCALES, FixedDynamics
from test_train import assert_same_state, deterministic, load, scalars, small

from ppo_cbp.errors import UsageError
from ppo_cbp.ppo.environments import make_env
from ppo_cbp.ppo.evaluation import deterministic_policy, evaluate, make_eval_env
from ppo_cbp.ppo.settings import resolve_args
from ppo_cbp.train import Args, main

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "ppo_cbp" / "train.py"
EVERYTHING = [
    "--dynamics", "friction", "gravity", "mass", "damping", "gear",
    "--obs-permute", "--obs-offset", "0.5", "--reward-flip",
]  # fmt: skip


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dynamics", "friction", "gravity", "--dynamics-range", "gravity=0,2"], "0 < LOW"),
        (["--dynamics", "gravity", "--dynamics-range", "gravity=-1,2"], "0 < LOW"),
        (["--dynamics", "mass", "--dynamics-range", "mass=2,1"], "0 < LOW <= HIGH"),
        (["--dynamics", "mass", "--dynamics-range", "mass=a,b"], "QUANTITY=LOW,HIGH"),
        (["--dynamics", "gravity", "--dynamics-range", "gear=0.5,2"], "not a multiplier"),
        (["--dynamics", "viscosity"], "--dynamics"),
        (["--dynamics", "gravity", "gravity"], "--dynamics"),
        (["--friction-table", "paper", "--seed", "100"], "seeds 0-99"),
        (["--friction-table", "paper", "--seed", "0", "--steps", "200_000_000"], "needs 101"),
        (["--env", "Ant-v4", "--paper-exact"], "50 frictions"),
        (["--friction-table", "paper", "--dynamics", "gravity"], "friction among"),
        (["--friction-every", "0", "--reward-flip"], "--reward-flip"),
        (["--obs-offset", "-1"], "--obs-offset"),
        (["--eval-previous", "2"], "--eval-previous"),
        (["--eval-every", "100", "--eval-episodes", "0"], "--eval-episodes"),
    ],
)
def test_bad_settings_are_one_error_line_and_write_nothing(tmp_path, argv, needle):
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(TRAIN), "--runs-dir", str(runs), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert proc.stdout == "" and not runs.exists()


def test_resolve_args_chooses_the_table():
    assert resolve_args(Args()).friction_table == "drawn"
    exact = dict(paper_exact=True, steps=20_000_000)
    assert resolve_args(Args(env="Ant-v5", **exact)).friction_table == "paper"
    assert resolve_args(Args(env="Hopper-v4", **exact)).friction_table == "drawn"
    assert (
        resolve_args(Args(env="Ant-v4", friction_every=0, paper_exact=True)).friction_table
        == "drawn"
    )
    with pytest.raises(UsageError, match="50 frictions"):
        resolve_args(Args(env="Ant-v4", paper_exact=True))  # 100M steps: 51 segments


def test_paper_table_gives_env_0_row_seed_in_order():
    row = np.load(ROOT / "envs" / "data" / "paper_frictions.npy", allow_pickle=False)[3]
    args = resolve_args(
        Args(
            env="Ant-v4",
            seed=3,
            friction_table="paper",
            friction_every=200,
            steps=9000,
            num_steps=512,
            num_minibatches=4,
        )
    )
    env = make_env(args, 0)()
    env.reset(seed=3)
    seen = [env.get_wrapper_attr("friction")]
    rng = np.random.default_rng(0)
    for _ in range(3000):
        _, _, terminated, truncated, info = env.step(rng.uniform(-1, 1, 8))
        if info["friction"] != seen[-1]:
            seen.append(info["friction"])
        if terminated or truncated:
            env.reset()
    assert len(seen) >= 5 and seen == row[: len(seen)].tolist()


def test_each_quantity_keeps_its_sequence_when_another_is_added():
    def gravity(dynamics):
        args = resolve_args(Args(env="Hopper-v4", dynamics=dynamics, friction_every=100))
        return [
            make_env(args, 0)().get_wrapper_attr("segment_setting")(k)["gravity"] for k in range(4)
        ]

    assert gravity(("gravity",)) == gravity(("friction", "gravity", "mass"))
    assert gravity(("gravity",)) == gravity(("gravity", "gear"))


def test_evaluation_equals_a_hand_loop():
    torch.manual_seed(0)
    actor = torch.nn.Sequential(torch.nn.Linear(11, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    setting = {
        "friction": 0.3,
        "gravity": 1.5,
        "mass": 0.8,
        "permute": np.arange(11)[::-1].copy(),
        "direction": -1.0,
    }
    policy = deterministic_policy(actor)
    returns = evaluate(policy, "Hopper-v4", setting, 2, seed=11)
    env = make_eval_env("Hopper-v4", setting)
    assert isinstance(env, FixedDynamics)
    expected = []
    for episode in range(2):
        obs, _ = env.reset(seed=11 if episode == 0 else None)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        expected.append(total)
    assert returns == expected


# ------------------------------------------------------------------------------------------------
# end-to-end (slow)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "env_id", ["HalfCheetah-v4", "HalfCheetah-v5", "Humanoid-v4", "Humanoid-v5"]
)
def test_every_change_trains_on_the_new_bodies(tmp_path, env_id):
    args = Args(
        **{
            **vars(small(tmp_path, env=env_id, friction_every=300)),
            **dict(
                dynamics=("friction", *SCALES),
                obs_permute=True,
                obs_offset=0.5,
                reward_flip=True,
                dynamics_drift=True,
            ),
        }
    )
    main(args)
    s = scalars(tmp_path / "run")
    for q in ("friction", *SCALES):
        assert f"env/{q}" in s and len(s[f"env/{q}"]) == 4


CHANGES = dict(
    dynamics=("friction", "gravity", "mass", "damping", "gear"),
    dynamics_drift=True,
    obs_permute=True,
    obs_offset=0.5,
    reward_flip=True,
    friction_every=700,
)


@pytest.mark.slow
@pytest.mark.parametrize("drift", [False, True])
def test_resume_in_the_middle_of_a_segment_and_of_a_drift(tmp_path, drift):
    kw = dict(
        CHANGES,
        env="Hopper-v4",
        friction_every=300,
        dynamics_drift=drift,
        num_envs=2,
        steps=2048,
        cbp=True,
        maturity_threshold=4,
        replacement_rate=0.05,
    )
    whole = main(small(tmp_path / "whole", **kw))
    main(small(tmp_path / "half", **{**kw, "steps": 1024}))
    state = load(tmp_path / "half" / "run")
    env0 = state["envs"][0]
    schedule = env0["episode"]["friction"]  # at the current episode's reset
    assert schedule["segment"] >= 1 and len(env0["actions"]) > 0  # mid-episode, mid-segment
    main(small(tmp_path / "half", **{**kw, "resume": str(tmp_path / "half" / "run")}))
    assert_same_state(load(whole.run_dir), load(tmp_path / "half" / "run"))
    assert deterministic(scalars(whole.run_dir)) == deterministic(
        scalars(tmp_path / "half" / "run")
    )


@pytest.mark.slow
def test_training_is_unchanged_by_evaluation(tmp_path):
    kw = dict(CHANGES, env="Hopper-v4", steps=1536, friction_every=200, normalize_obs=True)
    plain = main(small(tmp_path / "plain", **kw))
    evaluated = main(
        small(tmp_path / "eval", **kw, eval_every=512, eval_episodes=1, eval_previous=2)
    )
    assert_same_state(load(plain.run_dir), load(evaluated.run_dir))
    a, b = scalars(plain.run_dir), scalars(evaluated.run_dir)
    evals = {k for k in b if k.startswith("eval/")}
    assert {"eval/return", "eval/return_previous", "eval/return_previous_1"} <= evals
    assert deterministic(a) == deterministic({k: v for k, v in b.items() if k not in evals})
