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
import torch.nn.functional as F

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
    "cbp+adam+trac",
    "trac+layer_norm",
    "kron",
    "cbp+kron+l2_init",
    "kron+layer_norm",
    # the architectural methods, alone and with the others
    "layer_norm",
    "nap",
    "crelu",
    "dff",
    "cbp+l2_init+layer_norm",
    "redo+layer_norm",
    "cbp+crelu",
    "cbp+dff",
    "redo+crelu",
    "cbp+nap",
    "adam+nap+adam_reset",
    "upgd+layer_norm",
    "layer_norm+soft_snp+weight_clipping",
    "crelu+parseval",
    "snp+layer_norm",
    "snp+l2_init+dff",
    "trac+dff",
    "adam+crelu+layer_norm+head_reset",
    "l2+nap+snp_init",
]
ARCHITECTURAL = ("layer_norm", "nap", "crelu", "dff")


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
        out = torch.empty(x.shape[0], x.shape[1], SIZES[-1], dtype=F64, device=x.device)
        learner.step(x, y, out)
        outputs.append(out)
    return torch.stack(outputs)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


@pytest.mark.parametrize(
    "batch, device", [(1, "cpu"), (2, "cpu"), pytest.param(1, "cuda", marks=CUDA)]
)
@pytest.mark.parametrize("spec", SPECS)
def test_fused_equals_autograd_learner(spec, batch, device):
    """Batch 1 on the CPU runs the kernels, batch 2 and the GPU the tensor-op path."""
    m = method(spec)
    assert uses_fused_trainer(m)
    kw = dict(loss="cross_entropy", device=torch.device(device), dtype=F64)
    fused, autograd = Learner(SIZES, [0, 5], m, **kw), AutogradLearner(SIZES, [0, 5], m, **kw)
    start = [w.clone() for w in fused.net.weights()]
    steps = [(x.to(device), y.to(device)) for x, y in stream(40, 2, batch)]
    out_f, out_a = train(fused, steps), train(autograd, steps)
    torch.testing.assert_close(out_f, out_a, rtol=0, atol=1e-12)
    for a, b, w0 in zip(fused.net.weights(), autograd.net.weights(), start, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        if "trac" not in spec:  # TRAC's scale starts at 1e-8 (its source's s_prior)
            assert not torch.equal(a, w0)
    norms_f, norms_a = fused.net.layer_norms(), autograd.net.stacked.layer_norms()
    assert len(norms_f) == len(norms_a) == (2 if {"layer_norm", "nap"} & set(m.methods) else 0)
    for pair_f, pair_a in zip(norms_f, norms_a, strict=True):
        for a, b in zip(pair_f, pair_a, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if norms_f and "trac" not in spec:  # the gains and offsets were trained
        assert not torch.equal(norms_f[0][1], torch.zeros_like(norms_f[0][1]))
    assert torch.equal(fused.units_replaced(), autograd.units_replaced())
    if "cbp" in spec or "redo" in spec:
        assert fused.units_replaced().min() > 0


@pytest.mark.parametrize(
    "spec",
    [
        "cbp+adam+l2_init",
        "upgd",
        "snp+l2_init+soft_snp",
        "trac",
        "cbp+layer_norm",
        "snp+nap",
        "redo+crelu+dropout",
        "upgd+dff+layer_norm",
        "dropout+layer_norm",
        "injection+snp",
    ],
)
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
        for a, b in zip(stacked.net.parameters(), alone.net.parameters(), strict=True):
            assert torch.equal(a[i : i + 1], b)


@pytest.mark.parametrize(
    "spec",
    [
        "cbp+adam+l2_init",
        "upgd+snp_init",
        "trac+head_reset",
        "cbp+nap",
        "adam+redo+crelu+layer_norm",
        "dropout+dff+snp",
        "upgd+layer_norm",
        "injection+adam",
    ],
)
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
    for a, b in zip(whole.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)
    x = steps[0][0]
    for a, b in zip(whole.net.forward(x), resumed.net.forward(x), strict=True):  # frozen heads
        torch.testing.assert_close(a, b, rtol=0, atol=0)


INJECTIONS = [
    ("injection", 2),
    ("injection", 1),
    ("injection+adam", 2),
    ("injection+adam", 1),
    ("injection+l2+snp", 2),
]


@pytest.mark.parametrize(
    "batch, device", [(1, "cpu"), (2, "cpu"), pytest.param(1, "cuda", marks=CUDA)]
)
@pytest.mark.parametrize("spec, layers", INJECTIONS)
@pytest.mark.parametrize("sizes", [SIZES, [6, 8, 3]], ids=["3-layers", "head-is-all"])
def test_injection_equals_the_autograd_learner(spec, layers, batch, device, sizes):
    """Three injections (every 12 steps): the fused trainer with the frozen heads joined in one
    wider MLP equals the autograd learner's InjectableNetwork, step by step, and so do the
    outputs and features that the metrics read; also where the head is the whole network (SCR's
    20-5-1 with its default two-layer head: phi is the input)."""
    m = method(spec, injection_layers=layers)
    assert uses_fused_trainer(m)
    kw = dict(loss="cross_entropy", device=torch.device(device), dtype=F64)
    fused, autograd = Learner(sizes, [0, 5], m, **kw), AutogradLearner(sizes, [0, 5], m, **kw)
    steps = [(x.to(device), y.to(device)) for x, y in stream(40, 2, batch)]
    out_f, out_a = train(fused, steps), train(autograd, steps)
    assert fused.injection.injections == autograd.module.injections == 3
    torch.testing.assert_close(out_f, out_a, rtol=0, atol=1e-12)
    for a, b in zip(fused.net.weights(), autograd.net.weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    x = steps[0][0]
    (y_f, h_f), (y_a, h_a) = fused.net.forward(x), autograd.net.forward(x)
    torch.testing.assert_close(y_f, y_a, rtol=0, atol=1e-12)
    for a, b in zip(h_f, h_a, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the body trains on all heads' gradients: it has moved since the first injection
    assert not torch.equal(fused.net.weights()[0], Learner(sizes, [0, 5], m, **kw).net.weights()[0])


def test_injection_on_the_fused_trainer_combines_only_as_tested():
    for spec, fused in [
        ("injection+weight_clipping", False),
        ("injection+upgd", False),
        ("injection+layer_norm", False),
        ("injection+l2+adam+snp", True),
    ]:
        assert uses_fused_trainer(method(spec, injection_layers=1)) == fused, spec
    assert not uses_fused_trainer(method("injection", injection_layers=3))


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


# --------------------------------------------------------------------------------------------
# The architectural methods: dropout with them, the metrics' view, the unit layers, old runs


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("spec", ["dropout+layer_norm", "dropout+dff", "dropout+crelu+nap"])
def test_dropout_with_the_architectures_equals_its_definition(spec, batch):
    """The autograd learner has no dropout: each step is checked against the definition, by
    autograd from the parameters before the step, with the trainer's scaled keep-mask of the
    step on each hidden layer's features (after the LayerNorm and the activation):
    ``z_l = h_{l-1} W_l^T + b_l``, ``h_l = (act(LN(z_l)) * keep_l)``, the output before the
    update, and SGD's step ``theta <- theta - lr (g + wd theta)`` (NaP's projection after it)."""
    m = method(spec)
    learner = Learner(SIZES, [0, 5], m, loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    net, trainer = learner.net, learner.trainer
    dropped = 0
    for x, y in stream(25, 2, batch):
        before = [t.detach().clone().requires_grad_() for t in net.parameters()]
        out = torch.empty(2, batch, SIZES[-1], dtype=F64)
        learner.step(x, y, out)
        keep = trainer._uniform[:, trainer._uniform_pos - batch : trainer._uniform_pos]
        dropped += int((keep == 0).sum())
        h, params, offset = x[..., :-1], iter(before), 0
        for layer in range(len(net.params)):
            w, b = next(params), next(params)
            z = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if layer == len(net.params) - 1:
                break
            if net.norm_params:
                gain, shift = next(params), next(params)
                z = F.layer_norm(z, z.shape[-1:], eps=1e-5) * gain.unsqueeze(1) + shift.unsqueeze(1)
            if net.paired == "crelu":
                f = torch.stack((torch.relu(z), torch.relu(-z)), dim=-1).flatten(-2)
            elif net.paired == "dff":
                f = torch.stack((torch.sin(z), torch.cos(z)), dim=-1).flatten(-2)
            else:
                f = torch.relu(z)
            h = f * keep[..., offset : offset + f.shape[-1]]
            offset += f.shape[-1]
        torch.testing.assert_close(out, z.detach(), rtol=0, atol=1e-12)
        loss = sum(F.cross_entropy(z[s], y[s]) for s in range(2))
        grads = torch.autograd.grad(loss, before)
        stepped = [(p - m.lr * (g + m.weight_decay * p)).detach() for p, g in zip(before, grads)]
        if "nap" in spec:
            learner_nap = learner.methods.entries[0][2]
            weights = stepped[0::4][:2] + [stepped[-2]]  # W of each layer
            for wt, target in zip(weights, learner_nap.initial_weight_norms, strict=True):
                wt.mul_((target / wt.flatten(1).norm(dim=1)).view(-1, 1, 1))
            for i in (2, 6):  # each LayerNorm's gain and offset, jointly
                scale = learner_nap.initial_norm_norms[i // 4] / torch.cat(
                    (stepped[i], stepped[i + 1]), 1
                ).norm(dim=1)
                stepped[i].mul_(scale.view(-1, 1))
                stepped[i + 1].mul_(scale.view(-1, 1))
        for a, b in zip(net.parameters(), stepped, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert dropped > 0


@pytest.mark.parametrize("spec", ["crelu+layer_norm", "dff", "nap"])
def test_the_metrics_read_what_the_autograd_learner_shows(spec):
    """``net.forward`` (outputs and the features each hidden layer hands the next) and
    ``net.outputs_per_unit`` of the fused learner are the autograd learner's."""
    m = method(spec)
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    fused, autograd = Learner(SIZES, [0, 5], m, **kw), AutogradLearner(SIZES, [0, 5], m, **kw)
    steps = list(stream(15, 2, 1))
    train(fused, steps), train(autograd, steps)
    x = next(stream(1, 2, 9, seed=4))[0]
    out_f, hidden_f = fused.net.forward(x)
    out_a, hidden_a = autograd.net.forward(x)
    torch.testing.assert_close(out_f, out_a, rtol=0, atol=1e-12)
    assert len(hidden_f) == len(hidden_a) == 2
    for a, b in zip(hidden_f, hidden_a, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert fused.net.outputs_per_unit == autograd.net.outputs_per_unit


@pytest.mark.parametrize("spec", ["cbp+crelu+layer_norm", "redo+nap", "cbp+dff"])
def test_unit_layers_are_the_autograd_learners(spec):
    """CBP and ReDo see the same units: both outputs of a paired unit (``out_group``,
    ``averaged_outputs``), the LayerNorm's gain and offset reset to 1 and 0 with it."""
    m = method(spec)
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    fused, autograd = Learner(SIZES, [0, 5], m, **kw), AutogradLearner(SIZES, [0, 5], m, **kw)
    resetter = fused.cbp if fused.cbp is not None else fused.redo.redo
    for a, b in zip(resetter.layers, autograd.methods.resetters[""].layers, strict=True):
        assert (a.out_group, a.averaged_outputs, a.nonlinearity) == (
            b.out_group,
            b.averaged_outputs,
            b.nonlinearity,
        )
        assert [(tuple(t.shape), v) for t, v in a.norm] == [(tuple(t.shape), v) for t, v in b.norm]
        assert a.weight.shape == b.weight.shape and a.out_weight.shape == b.out_weight.shape


def test_online_norm_does_not_take_the_architectures():
    for spec in ("online_norm+crelu", "online_norm+dff"):
        with pytest.raises(UsageError, match="online_norm"):
            Learner(SIZES, [0], method(spec), loss="cross_entropy", device="cpu", dtype=F64)


def test_a_run_written_by_the_autograd_learner_resumes_there(tmp_path, monkeypatch, capsys):
    """A layer_norm run checkpointed before the fused trainer computed LayerNorm (its learner
    state holds the autograd learner's ``module``) continues on the autograd learner, exactly."""
    from stacked_runs import read_rows
    from test_supervised import scr_config

    from ppo_cbp.benchmarks import autograd_learner
    from ppo_cbp.benchmarks.scr import run_scr

    m = MethodConfig(method="cbp+layer_norm", replacement_rate=0.01, maturity_threshold=10)
    with monkeypatch.context() as patch:  # the learner choice before this change
        patch.setattr(autograd_learner, "uses_fused_trainer", lambda method: False)
        full = scr_config(tmp_path, "full", method=m, seeds=[1, 2])
        run_scr(full)
        part = scr_config(tmp_path, "part", method=m, seeds=[1, 2])
        run_scr(part, stop_after=1)
    assert "module" in torch.load(part.out / "checkpoint.pt", weights_only=True)["learner"]
    capsys.readouterr()
    part.resume = True
    run_scr(part)
    assert "continues there" in capsys.readouterr().out
    for seed in (1, 2):
        assert read_rows(part.out, seed) == read_rows(full.out, seed)
