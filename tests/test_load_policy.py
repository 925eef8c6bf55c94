"""``ppo_cbp.load_policy``: a saved run's policy and value function reproduce the trainer's
networks on the same observations, for every network the trainer builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_cbp import load_policy, load_value
from ppo_cbp.errors import UsageError
from ppo_cbp.ppo.agent import make_agent
from ppo_cbp.ppo.run import seed_everything
from ppo_cbp.ppo.settings import args_from_dict, resolve_args
from ppo_cbp.train import Args, main

ROOT = Path(__file__).resolve().parents[1]

KINDS = {
    "plain": {},
    "layer_norm": dict(layer_norm=True),
    "crelu": dict(crelu=True),
    "dff": dict(dff=True),
    "injection": dict(injection=True, friction_every=100, steps=384),
    "normalize_obs": dict(normalize_obs=True, cbp=True),
}


def tiny_run(root: Path, name: str, **kw) -> Path:
    """A few updates of 128 steps of Hopper with hidden layers (16, 16)."""
    base = dict(
        env="Hopper-v4",
        steps=256,
        num_steps=128,
        num_minibatches=2,
        update_epochs=1,
        hidden_sizes=(16, 16),
        runs_dir=str(root),
        run_name=name,
        progress=False,
        device="cpu",
        seed=3,
    )
    args = Args(**{**base, **kw})
    return main(args).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {kind: tiny_run(root, kind, **kw) for kind, kw in KINDS.items()}


def by_hand(state, x, hidden, layer_norm=False, crelu=False, dff=False, prefix=""):
    """The MLP of ``state`` on ``x`` in float64 numpy: Linear, [LayerNorm,] ReLU|CReLU|DFF,
    ..., Linear (indices as the trainer's ``nn.Sequential``s number them)."""
    p = {k[len(prefix) :]: v.double().numpy() for k, v in state.items() if k.startswith(prefix)}
    i = 0
    for _ in range(hidden):
        x = x @ p[f"{i}.weight"].T + p[f"{i}.bias"]
        i += 1
        if layer_norm:
            mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
            x = (x - mu) / np.sqrt(var + 1e-5) * p[f"{i}.weight"] + p[f"{i}.bias"]
            i += 1
        if crelu:
            x = np.stack((np.maximum(x, 0), np.maximum(-x, 0)), -1).reshape(len(x), -1)
        elif dff:  # unit i's sin at column 2i, cos at 2i + 1
            x = np.stack((np.sin(x), np.cos(x)), -1).reshape(len(x), -1)
        else:
            x = np.maximum(x, 0)
        i += 1
    return x @ p[f"{i}.weight"].T + p[f"{i}.bias"]


def normalized(ckpt, obs):
    rms = ckpt["obs_rms"]
    if rms is None:
        return obs.astype(np.float32).astype(np.float64)
    z = (obs - rms["mean"].numpy()) / np.sqrt(rms["var"].numpy() + 1e-8)
    return np.clip(z, -10, 10).astype(np.float32).astype(np.float64)


def observations(n=9, seed=0):
    return np.random.default_rng(seed).normal(0, 2, (n, 11))


def trainer_agent(ckpt):
    """The trainer's agent (optimizer and methods too) restored from the checkpoint."""
    args = resolve_args(args_from_dict(Args, ckpt["args"]))
    generators, seeds = seed_everything(args.seed, torch.device("cpu"))
    agent = make_agent(args, 11, 3, torch.device("cpu"), seeds, generators["perturb"])
    agent.load_state_dict(ckpt)
    return agent


@pytest.mark.parametrize("kind", ["plain", "layer_norm", "crelu", "dff", "normalize_obs"])
def test_actions_and_values_equal_the_networks_by_hand(runs, kind):
    policy = load_policy(runs[kind])
    ckpt = torch.load(runs[kind] / "checkpoint.pt", weights_only=True)
    obs = observations()
    x = normalized(ckpt, obs)
    flags = dict(layer_norm=kind == "layer_norm", crelu=kind == "crelu", dff=kind == "dff")
    mean = by_hand(ckpt["actor"], x, 2, **flags)
    value = by_hand(ckpt["critic"], x, 2, **flags)[:, 0]
    np.testing.assert_allclose(policy(obs), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy.value(obs), value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load_value(runs[kind])(obs), value, rtol=1e-5, atol=1e-6)
    assert (ckpt["obs_rms"] is not None) == (kind == "normalize_obs")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_actions_equal_the_trainer_agents(runs, kind):
    policy = load_policy(runs[kind] / "checkpoint.pt")
    ckpt = policy.checkpoint
    agent = trainer_agent(ckpt)
    obs = observations(seed=1)
    x = torch.from_numpy(normalized(ckpt, obs).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_array_equal(policy(obs), agent.actor(x).numpy())
        np.testing.assert_array_equal(policy.value(obs), agent.critic(x)[:, 0].numpy())
    if kind == "injection":  # the segment changed: the heads were injected once
        assert ckpt["actor"]["_extra_state"]["injections"] >= 1


def test_single_torch_and_sampled_observations(runs):
    policy = load_policy(runs["normalize_obs"])
    obs = observations(4)
    batch = policy(obs)
    assert batch.shape == (4, 3) and batch.dtype == np.float32
    np.testing.assert_allclose(policy(obs[0]), batch[0], rtol=1e-6, atol=1e-6)  # BLAS by batch size
    t = policy(torch.from_numpy(obs))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), batch)
    assert np.shape(policy.value(obs[0])) == ()
    a = policy(obs, deterministic=False, seed=5)
    b = policy(obs, deterministic=False, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a, b)
    eps = torch.randn((4, 3), generator=torch.Generator().manual_seed(5)).numpy()
    std = policy.checkpoint["log_std"].exp().numpy()
    np.testing.assert_allclose(a, batch + std * eps, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_policy_equals_cpu(runs):
    obs = observations()
    for kind in KINDS:
        cpu, cuda = load_policy(runs[kind]), load_policy(runs[kind], device="cuda")
        out = cuda(torch.from_numpy(obs).cuda())
        assert out.device.type == "cuda"
        np.testing.assert_allclose(out.cpu().numpy(), cpu(obs), rtol=1e-4, atol=1e-5)


def test_errors_are_one_usage_error(runs, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_policy(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="holds no checkpoint.pt"):
        load_policy(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="checkpoint"):
        load_policy(bad)
    sup = tmp_path / "sup"
    sup.mkdir()
    torch.save({"rows": [], "config": {}, "benchmark": "scr"}, sup / "checkpoint.pt")
    with pytest.raises(UsageError, match="load_learner"):
        load_policy(sup)


def test_importing_the_package_imports_neither_gymnasium_nor_the_trainer():
    code = (
        "import sys, ppo_cbp; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('gymnasium', 'torch', 'mujoco') "
        "or m in ('ppo_cbp.train', 'ppo_cbp.ppo.load', 'ppo_cbp.benchmarks.load')]; "
        "print(bad); assert not bad; assert callable(ppo_cbp.load_policy)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
