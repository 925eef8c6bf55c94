"""The fused MLP trainer with the method suite's hooks (:class:`ppo_cbp.benchmarks.common.Learner`).

Every method it runs beyond plain SGD is checked against the autograd learner, whose
compositions are checked against float64 references written from the methods' definitions
(``tests/test_method_suite.py``): the same weights to 1e-12 in float64 over steps and task
boundaries, at batch 1 (the CPU kernels) and batch 2 (the tensor-op path), with settings that
make every method act. Also: stacked seeds equal each seed alone bit for bit, a checkpoint
resumes exactly (the trainer's own Adam of older checkpoints included), resets of a view's
optimizer state reach its base's, and the kernels equal their formulas.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppo_cbp.benchmarks import scr
from ppo_cbp.benchmarks.autograd_learner import AutogradLearner, uses_fused_trainer
from ppo_cbp.benchmarks.common import Learner, MethodConfig, resolve_method
from ppo_cbp.errors import UsageError
from ppo_cbp.nets import kernels
from ppo_cbp.nets.units import optimizer_state_tensors
from ppo_cbp.plasticity.resets import reset_adam_state_

F64 = torch.float64
SIZES = [6, 8, 7, 3]
ACTIVE = dict(  # settings under which every method changes the weights within 40 steps
    l2_init=0.1,
    parseval=1e-2,
    soft_shrink_perturb=0.95,
    weight_clipping=0.6,
    shrink_perturb_init=0.5,
    head_reset=2,
    replacement_rate=0.1,
    maturity_threshold=3,
    redo_threshold=0.6,
    redo_period=4,
    noise_std=1e-2,
    upgd_sigma=1e-2,
)
SPECS = [
    "l2_init",
    "parseval",
    "soft_snp",
    "weight_clipping",
    "snp_init",
    "head_reset",
    "adam",
    "adam+adam_reset",
    "adam+head_reset",
    "upgd",
    "trac",
    "adam+trac",
    "cbp+l2_init",
    "cbp+adam+l2_init",
    "cbp+soft_snp+weight_clipping",
    "redo+adam+parseval",
    "redo+weight_clipping",
    "snp+l2_init+soft_snp",
    "snp+adam",
    "l2+parseval+snp_init",
    "cbp+upgd",
    "cbp+trac+head_reset",
    "kron",
    "cbp+kron+l2_init",
]


def method(spec: str, **extra):
    names = set(spec.split("+"))
    given = {k: v for k, v in ACTIVE.items() if _used_by(k) in names}
    return resolve_method(MethodConfig(method=spec, **given, **extra), scr.DEFAULTS)


def _used_by(setting: str) -> str:
    from ppo_cbp.plasticity import suite

    return suite.SETTINGS.get(setting, "snp" if setting == "noise_std" else "")


def stream(steps: int, S: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.ones(S, batch, SIZES[0] + 1, dtype=F64)
        x[..., :-1] = torch.randn(S, batch, SIZES[0], generator=g, dtype=F64)
        yield x, torch.randint(0, SIZES[-1], (S, batch), generator=g)


def train(learner, steps, boundary_every: int = 12):
    outputs = []
    for t, (x, y) in enumerate(steps):
        if t and t % boundary_every == 0:
            learner.task_boundary()
            learner.new_segment()
        out = torch.empty(x.shape[0], x.shape[1], SIZES[-1], dtype=F64)
        learner.step(x, y, out)
        outputs.append(out)
    return torch.stack(outputs)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("spec", SPECS)
def test_fused_equals_autograd_learner(spec, batch):
    m = method(spec)
    assert uses_fused_trainer(m)
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    fused, autograd = Learner(SIZES, [0, 5], m, **kw), AutogradLearner(SIZES, [0, 5], m, **kw)
    start = [w.clone() for w in fused.net.weights()]
    steps = list(stream(40, 2, batch))
    out_f, out_a = train(fused, steps), train(autograd, steps)
    torch.testing.assert_close(out_f, out_a, rtol=0, atol=1e-12)
    for a, b, w0 in zip(fused.net.weights(), autograd.net.weights(), start, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        if "trac" not in spec:  # TRAC's scale starts at 1e-8 (its source's s_prior)
            assert not torch.equal(a, w0)
    assert torch.equal(fused.units_replaced(), autograd.units_replaced())
    if "cbp" in spec or "redo" in spec:
        assert fused.units_replaced().min() > 0


@pytest.mark.parametrize("spec", ["cbp+adam+l2_init", "upgd", "snp+l2_init+soft_snp", "trac"])
def test_stacked_seeds_equal_each_seed_alone(spec):
    m = method(spec)
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=torch.float32)
    seeds = [3, 8]
    steps = [(x.float(), y) for x, y in stream(30, 2, 1)]
    stacked = Learner(SIZES, seeds, m, **kw)
    train(stacked, steps)
    for i, s in enumerate(seeds):
        alone = Learner(SIZES, [s], m, **kw)
        train(alone, [(x[i : i + 1], y[i : i + 1]) for x, y in steps])
        for a, b in zip(stacked.net.params, alone.net.params, strict=True):
            assert torch.equal(a[i : i + 1], b)


@pytest.mark.parametrize("spec", ["cbp+adam+l2_init", "upgd+snp_init", "trac+head_reset"])
def test_checkpoint_resumes_exactly(spec):
    m = method(spec)
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=torch.float32)
    steps = [(x.float(), y) for x, y in stream(40, 2, 1)]
    whole = Learner(SIZES, [0, 1], m, **kw)
    train(whole, steps)
    first = Learner(SIZES, [0, 1], m, **kw)
    train(first, steps[:24])
    state = first.state_dict()
    resumed = Learner(SIZES, [0, 1], m, **kw)
    resumed.load_state_dict(state)
    resumed.task_boundary()  # step 24 starts a task in the whole run
    resumed.new_segment()
    train(resumed, steps[24:])
    for a, b in zip(whole.net.params, resumed.net.params, strict=True):
        assert torch.equal(a, b)


def test_adam_checkpoint_of_the_trainers_own_adam_resumes():
    """A checkpoint written when plain Adam ran inside the trainer (its moments of P = [W | b]
    and one step count, no ``optimizer`` entry) continues as the run it came from."""
    m = method("adam")
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    steps = list(stream(30, 2, 1))
    whole = Learner(SIZES, [0, 1], m, **kw)
    train(whole, steps)
    first = Learner(SIZES, [0, 1], m, **kw)
    train(first, steps[:12])
    state = first.state_dict()
    adam = state.pop("optimizer")["state"]
    old = dict(state)
    old.pop("methods")
    old["trainer"] = {
        **state["trainer"],
        "exp_avg": [adam[i]["exp_avg"] for i in range(len(SIZES) - 1)],
        "exp_avg_sq": [adam[i]["exp_avg_sq"] for i in range(len(SIZES) - 1)],
    }
    assert old["trainer"]["steps"] == int(adam[0]["step"]) == 12
    resumed = Learner(SIZES, [0, 1], m, **kw)
    resumed.load_state_dict(old)
    train(resumed, steps[12:])
    for a, b in zip(whole.net.params, resumed.net.params, strict=True):
        assert torch.equal(a, b)


def test_view_state_resets_reach_the_base():
    """Adam over P = [W | b]: CBP's state lookup of the weight view gives the view's slice of
    P's moments; resetting the weight and bias views together resets P's state (step count
    included), the weight view alone only its moments."""
    P = torch.randn(2, 3, 5)
    w, b = P[..., :-1], P[..., -1]
    P.grad = torch.randn(2, 3, 5)
    opt = torch.optim.Adam([P], lr=0.1)
    opt.step()
    state = opt.state[P]
    (m_w, v_w) = optimizer_state_tensors(opt)(w)
    assert m_w.shape == w.shape
    m_w[0, 1, 2] = 7.0
    assert state["exp_avg"][0, 1, 2] == 7.0
    reset_adam_state_(opt, [w])
    assert state["exp_avg"][..., :-1].abs().sum() == 0
    assert state["exp_avg"][..., -1].abs().sum() > 0 and int(state["step"]) == 1
    reset_adam_state_(opt, [w, b])
    assert state["exp_avg"].abs().sum() == 0 and int(state["step"]) == 0


def test_online_norm_does_not_take_gradient_methods():
    with pytest.raises(UsageError, match="online_norm"):
        Learner(
            SIZES,
            [0],
            method("online_norm+l2_init"),
            loss="cross_entropy",
            device=torch.device("cpu"),
            dtype=F64,
        )


@pytest.mark.parametrize("first", [True, False])
def test_gradient_kernels_equal_their_formulas(first):
    rng = np.random.default_rng(0)
    S, K, J = 2, 5, 7
    p = rng.standard_normal((S, K, J + 1))
    delta, x = rng.standard_normal((S, K)), rng.standard_normal((S, J + 1))
    below, grad = np.full((S, J), np.nan), np.full((S, K, J + 1), np.nan)
    kernels.backward_gradient_(p, delta, x, None if first else below, grad)
    np.testing.assert_allclose(grad, delta[:, :, None] * x[:, None, :], rtol=0, atol=1e-14)
    if not first:
        np.testing.assert_allclose(
            below, np.einsum("sk,skj->sj", delta, p[..., :-1]), rtol=0, atol=1e-14
        )
    beta, alpha = 0.9, -0.1
    out_abs, in_abs = np.full((S, J), np.nan), np.full((S, K), np.nan)
    expected = beta * p + alpha * grad
    kernels.sgd_apply_(p, grad, beta, alpha, None if first else out_abs, in_abs)
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(in_abs, np.abs(expected[..., :-1]).sum(2), rtol=1e-14)
    if not first:
        np.testing.assert_allclose(out_abs, np.abs(expected[..., :-1]).sum(1), rtol=1e-14)
