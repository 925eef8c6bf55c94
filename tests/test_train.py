"""End-to-end tests of the PPO trainer (ppo_cbp/train.py) on short runs."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_cbp.errors import UsageError
from ppo_cbp.ppo.agent import make_agent, method_state
from ppo_cbp.ppo.run import seed_everything
from ppo_cbp.ppo.settings import resolve_args
from ppo_cbp.train import Args, NonFiniteLossError, main

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "ppo_cbp" / "train.py"

PLASTICITY = [
    "dead_units",
    "dormant_ratio",
    "effective_rank",
    "stable_rank",
    "weight_magnitude/layer0",
    "weight_magnitude/layer1",
    "weight_magnitude/layer2",
    "weight_magnitude/overall",
    "max_weight_change",
    "units_replaced",
    "feature_norm",
    "gradient_norm",
]
REQUIRED = [
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "charts/learning_rate",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "env/friction",
    "plasticity/policy/churn",
    "plasticity/policy/kl",
] + [f"plasticity/{net}/{name}" for net in ("policy", "value") for name in PLASTICITY]
# Wall-clock scalars cannot repeat between runs.
TIMING = ("charts/SPS", "perf/")


def small(tmp_path: Path, **kw) -> Args:
    """A few-update run: rollouts of 256 steps, 4 minibatches x 2 epochs."""
    base = dict(
        steps=1024,
        num_steps=256,
        num_minibatches=4,
        update_epochs=2,
        metrics_every=2,
        runs_dir=str(tmp_path),
        run_name="run",
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return Args(**base)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def deterministic(s: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    return {k: v for k, v in s.items() if not k.startswith(TIMING)}


def load(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["update"] == b["update"]
    for net in ("actor", "critic"):
        for k in a[net]:
            if isinstance(a[net][k], torch.Tensor):
                assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs"
            else:  # a module's extra state (an injected network's number of injections)
                assert a[net][k] == b[net][k], f"{net}.{k} differs"
    assert torch.equal(a["log_std"], b["log_std"])
    opt_a, opt_b = (s["optimizer"].get("base", s["optimizer"]) for s in (a, b))  # TRAC's base
    for pid, st in opt_a["state"].items():
        for k, v in st.items():
            other = opt_b["state"][pid][k]
            if isinstance(v, list):  # Kron's factors
                same = len(v) == len(other) and all(map(torch.equal, v, other))
            else:
                same = torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other
            assert same, f"optimizer {pid}.{k} differs"


# ------------------------------------------------------------------------------------------------
# every method on Hopper and Ant
# ------------------------------------------------------------------------------------------------

METHODS = {
    # Short runs: CBP's maturity threshold and ReDo's period are lowered so that both act.
    "plain": dict(),
    "cbp": dict(cbp=True, maturity_threshold=4, replacement_rate=0.05),
    "redo": dict(redo=True, redo_period=2),
    "l2": dict(l2=True),
    "shrink_perturb": dict(shrink_perturb=True),
    "standard_adam": dict(standard_adam=True),
}
# (weight decay, betas, noise std) each method must give the optimizer: the paper's values.
EXPECTED = {
    "plain": (0.0, (0.99, 0.99), 0.0),
    "cbp": (1e-4, (0.99, 0.99), 0.0),
    "redo": (1e-4, (0.99, 0.99), 0.0),
    "l2": (1e-3, (0.99, 0.99), 0.0),
    "shrink_perturb": (1e-4, (0.99, 0.99), 1e-5),
    "standard_adam": (0.0, (0.9, 0.999), 0.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("env", ["Hopper-v4", "Ant-v4"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_run_writes_every_scalar(tmp_path, env, method):
    result = main(small(tmp_path, env=env, **METHODS[method]))
    assert result.global_step == 1024 and result.updates == 4
    s = scalars(result.run_dir)
    missing = [k for k in REQUIRED if k not in s]
    assert not missing, f"missing scalars: {missing}"
    assert [step for step, _ in s["charts/SPS"]] == [256, 512, 768, 1024]
    # update 0 (the networks as built) and every metrics_every = 2 updates
    assert [step for step, _ in s["plasticity/policy/dead_units"]] == [0, 512, 1024]
    # at step 0 the networks as the seed initialises them: a fresh agent's weights
    args = resolve_args(small(tmp_path, env=env, **METHODS[method]))
    seeds = seed_everything(args.seed, torch.device("cpu"))[1]
    fresh = make_agent(args, 11, 3, torch.device("cpu"), seeds, torch.Generator())
    linears = [m for m in fresh.sequential_networks()[0][1] if isinstance(m, torch.nn.Linear)]
    overall = sum(m.weight.abs().sum().item() for m in linears) / sum(
        m.weight.numel() for m in linears
    )
    if env.startswith("Hopper"):  # 11 observations, 3 actions
        (step0,) = [v for step, v in s["plasticity/policy/weight_magnitude/overall"] if step == 0]
        assert step0 == pytest.approx(overall, rel=1e-6)
    assert all(v == pytest.approx(1e-4) for _, v in s["charts/learning_rate"])
    for net in ("policy", "value"):
        for _, v in s[f"plasticity/{net}/dead_units"] + s[f"plasticity/{net}/dormant_ratio"]:
            assert 0.0 <= v <= 1.0
        for _, v in s[f"plasticity/{net}/stable_rank"] + s[f"plasticity/{net}/effective_rank"]:
            assert 1.0 <= v <= 256.0
    replaced = [v for _, v in s["plasticity/policy/units_replaced"]]
    if method in ("cbp", "redo"):
        assert replaced == sorted(replaced)  # cumulative
    else:
        assert replaced == [0.0, 0.0, 0.0]
    if method == "cbp":
        # 2 layers x 256 units, eligible after 4 steps, 5% per step: many replacements.
        assert replaced[-1] > 100
    # each episode's return is logged once, at the step where it ended
    for _, length in s["charts/episodic_length"]:
        assert 1 <= length <= 1000

    wd, betas, noise = EXPECTED[method]
    config = json.loads((result.run_dir / "config.json").read_text())
    assert (
        config["weight_decay"] == wd
        and tuple((config["adam_beta1"], config["adam_beta2"])) == betas
    )
    assert config["noise_std"] == noise
    group = load(result.run_dir)["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == wd and tuple(group["betas"]) == betas


@pytest.mark.parametrize(
    "env, obs_dim", [("Hopper-v5", 11), ("Walker2d-v4", 17), ("Walker2d-v5", 17), ("Ant-v5", 105)]
)
def test_other_envs_run_with_their_default_observation(tmp_path, env, obs_dim):
    result = main(small(tmp_path, env=env, steps=256, metrics_every=1))
    state = load(result.run_dir)
    assert state["actor"]["0.weight"].shape == (256, obs_dim)
    assert "plasticity/value/stable_rank" in scalars(result.run_dir)


def test_paper_defaults():
    a = resolve_args(Args())
    assert (a.env, a.num_envs, a.num_steps, a.update_epochs, a.num_minibatches) == (
        "Ant-v4",
        1,
        2048,
        10,
        16,
    )
    assert a.num_steps * a.num_envs // a.num_minibatches == 128
    assert (a.learning_rate, a.gamma, a.gae_lambda, a.clip_coef, a.ent_coef, a.vf_coef) == (
        1e-4,
        0.99,
        0.95,
        0.2,
        0.0,
        1.0,
    )
    assert (a.adam_beta1, a.adam_beta2, a.adam_eps, a.weight_decay) == (0.99, 0.99, 1e-8, 0.0)
    assert (
        a.max_grad_norm is None
        and not a.normalize_obs
        and not a.normalize_reward
        and not a.anneal_lr
    )
    assert a.hidden_sizes == (256, 256) and a.init == "lecun_uniform" and a.log_std_init == 0.0
    assert a.bootstrap_truncation and a.friction_every == 2_000_000
    assert (a.friction_low, a.friction_high) == (0.02, 2.0)
    cbp = resolve_args(Args(cbp=True))
    assert (cbp.replacement_rate, cbp.maturity_threshold, cbp.decay_rate, cbp.utility) == (
        1e-4,
        10_000,
        0.99,
        "contribution",
    )
    assert cbp.weight_decay == 1e-4
    assert resolve_args(Args(cbp=True, weight_decay=0.0)).weight_decay == 0.0
    redo = resolve_args(Args(redo=True))
    assert (redo.redo_threshold, redo.redo_period, redo.weight_decay) == (0.1, 100, 1e-4)
    assert resolve_args(Args(cbp=True, l2=True)).weight_decay == 1e-3


def test_paper_exact_sets_the_released_behaviour():
    default = resolve_args(Args(cbp=True))
    assert not default.paper_exact
    assert default.bootstrap_truncation and default.reset_optimizer_state
    # the released slippery-Ant runs: 20M steps on the released friction table
    exact = resolve_args(tyro.cli(Args, args=["--cbp", "--paper-exact", "--steps", "20_000_000"]))
    assert (
        exact.paper_exact and exact.friction_table == "paper" and default.friction_table == "drawn"
    )
    assert not exact.bootstrap_truncation and not exact.reset_optimizer_state
    # the rest stays the paper's configuration
    same = {f for f in Args.__dataclass_fields__} - {
        "paper_exact",
        "bootstrap_truncation",
        "reset_optimizer_state",
        "friction_table",
        "steps",
    }
    assert all(getattr(exact, f) == getattr(default, f) for f in same)
    # each part is also reachable on its own
    one = resolve_args(Args(cbp=True, bootstrap_truncation=False))
    assert not one.bootstrap_truncation and one.reset_optimizer_state and not one.paper_exact


@pytest.mark.parametrize("paper_exact", [False, True])
def test_paper_exact_run_keeps_adam_state_and_draws_cbp_counts(tmp_path, paper_exact):
    """One update of one minibatch, so the run ends right after a CBP step that replaced
    floor(0.01 * 256) = 2 units per layer: with --paper-exact their Adam moments are left as
    the step made them (non-zero), by default they are zero; the released count rule keeps its
    generator in the checkpoint."""
    kw = dict(cbp=True, maturity_threshold=0, replacement_rate=0.01, paper_exact=paper_exact)
    kw.update(steps=256, num_minibatches=1, update_epochs=1, env="Hopper-v4")
    result = main(small(tmp_path, **kw))
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["paper_exact"] is paper_exact
    assert config["bootstrap_truncation"] is config["reset_optimizer_state"] is (not paper_exact)
    state = load(result.run_dir)
    policy = method_state(state, "cbp", "policy")
    assert (policy["count_rng"] is not None) is paper_exact
    replaced = torch.nonzero(policy["birth"][0][0] == policy["steps"]).flatten()
    assert len(replaced) == 2
    moments = state["optimizer"]["state"][0]  # the policy's first weight matrix
    for name in ("exp_avg", "exp_avg_sq"):
        rows = moments[name][replaced]
        assert (rows.abs().sum(1) > 0).all() if paper_exact else (rows == 0).all()
        assert moments[name].abs().sum() > 0


@pytest.mark.slow
def test_threads_default_to_one_per_env_up_to_the_cores(tmp_path):
    import os

    cores = len(os.sched_getaffinity(0))
    assert resolve_args(Args()).threads == 1
    assert resolve_args(Args(num_envs=2)).threads == min(2, cores)
    assert resolve_args(Args(num_envs=64)).threads == cores
    assert resolve_args(Args(num_envs=2, threads=1)).threads == 1
    # the run sets its own thread count and gives the caller's back when it ends
    before = torch.get_num_threads()
    main(small(tmp_path, env="Hopper-v4", steps=256, threads=before + 1))
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------------
# checkpoints and resume
# ------------------------------------------------------------------------------------------------


def _resume_kwargs(num_envs: int) -> dict:
    # Exercise every piece of checkpointed state: CBP replacing units, both normalisations,
    # friction changes mid-run (every 700 total steps), time-limit truncations (Hopper/Ant
    # episodes), several envs.
    return dict(
        env="Hopper-v4" if num_envs == 1 else "Ant-v4",
        num_envs=num_envs,
        metrics_every=1,
        cbp=True,
        maturity_threshold=10,
        replacement_rate=0.01,
        normalize_obs=True,
        normalize_reward=True,
        friction_every=700,
        checkpoint_every=0,
    )


@pytest.mark.slow
@pytest.mark.parametrize("num_envs", [1, 2])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, num_envs):
    kw = _resume_kwargs(num_envs)
    per_update = 256 * num_envs
    full = main(small(tmp_path, run_name="full", steps=8 * per_update, **kw))

    part = small(tmp_path, run_name="part", steps=3 * per_update, **kw)
    run = main(part).run_dir
    saved = tmp_path / "after3.pt"
    shutil.copy(run / "checkpoint.pt", saved)
    # Continue past the checkpoint, then "crash": the checkpoint goes back to update 3 while the
    # event file keeps the scalars of updates 4 and 5, which the resumed run must purge.
    main(Args(resume=str(run), steps=5 * per_update))
    shutil.copy(saved, run / "checkpoint.pt")
    resumed = main(Args(resume=str(run), steps=8 * per_update))
    assert resumed.run_dir == run and resumed.global_step == 8 * per_update

    assert_same_state(load(full.run_dir), load(run))
    a, b = deterministic(scalars(full.run_dir)), deterministic(scalars(run))
    assert sorted(a) == sorted(b)
    for tag in a:
        assert a[tag] == b[tag], tag
    assert len({v for _, v in a["env/friction"]}) >= 2  # the friction did change
    assert method_state(load(run), "cbp", "policy")["num_replaced"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_resume_continues_exactly(tmp_path, signum):
    cmd = [sys.executable, str(TRAIN), "--env", "Hopper-v4", "--steps", "1_000_000"]
    cmd += ["--num-steps", "256", "--num-minibatches", "1", "--update-epochs", "1"]
    cmd += ["--metrics-every", "3", "--cbp", "--checkpoint-every", "0", "--device", "cpu"]
    cmd += ["--runs-dir", str(tmp_path), "--run-name", "sig", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "sig"
    deadline = time.time() + 60
    while not (run / "config.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(2.0)  # let it train a few dozen updates
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "checkpoint saved" in err and f"--resume {run}" in err
    state = load(run)
    stopped = state["global_step"]
    assert 0 < stopped < 1_000_000 and stopped % 256 == 0

    common = dict(num_steps=256, num_minibatches=1, update_epochs=1, metrics_every=3, cbp=True)
    target = stopped + 3 * 256
    main(Args(resume=str(run), steps=target, progress=False))
    full = main(small(tmp_path, run_name="full", steps=target, env="Hopper-v4", **common))
    assert_same_state(load(full.run_dir), load(run))
    assert deterministic(scalars(full.run_dir)) == deterministic(scalars(run))


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    run = main(small(tmp_path, steps=256, seed=1)).run_dir
    with pytest.raises(UsageError) as e:
        main(Args(resume=str(run), seed=2, learning_rate=3e-4))
    assert "seed (checkpoint 1, now 2)" in str(e.value)
    assert "learning_rate (checkpoint None, now 0.0003)" in str(e.value)
    # a flag the checkpoint agrees with is fine
    assert main(Args(resume=str(run), seed=1, steps=512)).global_step == 512
    with pytest.raises(UsageError, match="already holds a run"):
        main(small(tmp_path, steps=256))


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path):
    # Adam moves every weight by ~lr per step: with lr = 1e30 the second minibatch overflows.
    with pytest.raises(NonFiniteLossError, match="last good state") as e:
        main(small(tmp_path, env="Hopper-v4", learning_rate=1e30))
    state = load(tmp_path / "run")
    assert state["global_step"] == 0 and str(tmp_path / "run" / "checkpoint.pt") in str(e.value)
    assert all(torch.isfinite(v).all() for v in state["actor"].values())


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------

BAD_CLI = {
    "unknown env id 'Pong-v9'": ["--env", "Pong-v9"],
    "--steps must be positive, got 0": ["--steps", "0"],
    "--replacement-rate must be in [0, 1], got 1.5": ["--cbp", "--replacement-rate", "1.5"],
    "--gamma must be in [0, 1], got -0.1": ["--gamma", "-0.1"],
    "resume path {tmp}/nowhere does not exist": ["--resume", "{tmp}/nowhere"],
    "--device cuda requested but no CUDA GPU is available": ["--device", "cuda"],
    "--cbp and --redo contradict": ["--cbp", "--redo"],
}


@pytest.mark.slow
def test_bad_inputs_exit_with_one_line_before_any_work(tmp_path):
    runs = tmp_path / "runs"
    procs = {}
    for message, argv in BAD_CLI.items():
        if "cuda" in message and torch.cuda.is_available():
            continue
        argv = [x.replace("{tmp}", str(tmp_path)) for x in argv]
        cmd = [sys.executable, str(TRAIN), *argv, "--runs-dir", str(runs)]
        procs[message.replace("{tmp}", str(tmp_path))] = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for message, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
        assert out == ""
    assert not runs.exists()  # nothing was created


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(standard_adam=True, adam_beta1=0.5), "--standard-adam"),
        (dict(l2=True, weight_decay=1e-4), "--l2"),
        (dict(noise_std=1e-3), "--noise-std only applies with --shrink-perturb"),
        (dict(maturity_threshold=5), "--maturity-threshold only applies with --cbp"),
        (dict(redo_threshold=0.2), "--redo-threshold only applies with --redo"),
        (dict(num_minibatches=3), "does not divide"),
        (dict(decay_rate=1.0, cbp=True), "--decay-rate must be < 1"),
        (dict(learning_rate=-1.0), "--learning-rate must be positive"),
        (dict(weight_decay=-1.0), "--weight-decay must be >= 0"),
        (dict(env="Ant-v3"), "unknown env id 'Ant-v3'"),
    ],
)
def test_conflicting_or_invalid_settings(kw, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        resolve_args(Args(**kw))


@pytest.mark.slow
def test_help_lists_field_docs():
    out = subprocess.run(
        [sys.executable, str(TRAIN), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in (
        "--env",
        "--cbp",
        "--redo",
        "--l2",
        "--shrink-perturb",
        "--standard-adam",
        "--resume",
        "--no-bootstrap-truncation",
        "--paper-exact",
    ):
        assert flag in text
    # the help wraps inside its boxes: compare the words without the box borders
    words = " ".join(out.stdout.replace("│", " ").split())
    assert "fraction of the eligible units replaced per minibatch update" in words


def test_running_mean_std_matches_numpy():
    from ppo_cbp.ppo.normalize import RunningMeanStd

    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(100, 4))
    # a negligible pseudo-count: the statistics are those of the data alone
    rms = RunningMeanStd((4,), epsilon=1e-300)
    for chunk in np.split(data, [1, 7, 30, 31, 64]):
        rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-10)
    assert math.isclose(rms.count, 100.0)


@pytest.mark.slow
@pytest.mark.parametrize("spin", [True, False])
def test_parallel_envs_step_like_separate_envs(spin):
    """Env i of ParallelEnvs follows the same trajectory as the same env stepped alone."""
    from ppo_cbp.envs.vector import ParallelEnvs, SingleEnv

    from ppo_cbp.train import make_env as _make_env_fn

    a = Args(env="Hopper-v4", num_envs=3, friction_every=300)
    envs = ParallelEnvs([_make_env_fn(a, i) for i in range(3)], spin=spin)
    alone = [SingleEnv(_make_env_fn(a, i)) for i in range(3)]
    try:
        rng = np.random.default_rng(0)
        obs = envs.reset([5, 6, 7])
        for i, env in enumerate(alone):
            np.testing.assert_array_equal(obs[i], env.reset([5 + i])[0])
        ended = 0
        for _ in range(300):
            actions = rng.uniform(-1, 1, (3, 3)).astype(np.float32)
            obs, reward, terminated, truncated, finals = envs.step(actions)
            finals = dict(finals)
            for i, env in enumerate(alone):
                o, r, te, tr, f = env.step(actions[i : i + 1])
                np.testing.assert_array_equal(obs[i], o[0])
                assert (reward[i], terminated[i], truncated[i]) == (r[0], te[0], tr[0])
                assert (i in finals) == bool(f)
                if f:
                    np.testing.assert_array_equal(finals[i], f[0][1])
                    ended += 1
        assert ended > 3  # Hopper falls quickly under random actions: resets were exercised
        assert envs.call("friction") == tuple(env.call("friction")[0] for env in alone)
    finally:
        envs.close()
        for env in alone:
            env.close()
