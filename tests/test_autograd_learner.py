"""The autograd learner of the MLP benchmarks against the fused, hand-written one (float64),
and how ``--method`` combinations are read."""

import pytest
import torch

from ppo_cbp.benchmarks.autograd_learner import AutogradLearner, make_learner, uses_fused_trainer
from ppo_cbp.benchmarks.common import Learner, MethodConfig, parse_methods, resolve_method
from ppo_cbp.benchmarks.permuted_mnist import DEFAULTS
from ppo_cbp.errors import UsageError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


def _method(spec: str, **overrides):
    return resolve_method(MethodConfig(method=spec, **overrides), DEFAULTS)


def _stream(steps: int, S: int, n_in: int, n_out: int, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.ones(S, 1, n_in + 1, dtype=F64)
        x[..., :-1] = torch.randn(S, 1, n_in, generator=g, dtype=F64)
        yield x.to(device), torch.randint(0, n_out, (S, 1), generator=g).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "spec, overrides",
    [
        ("bp", {}),
        ("l2", {}),
        ("adam", {}),
        ("snp", {"noise_std": 0.0}),
        ("cbp", {"replacement_rate": 0.02, "maturity_threshold": 5}),
        ("redo", {"redo_period": 7}),
        ("cbp+l2", {"replacement_rate": 0.02, "maturity_threshold": 5}),
        ("adam+redo", {"redo_period": 7}),
    ],
)
def test_autograd_path_equals_fused_path(device, spec, overrides):
    """Where both apply, autograd + torch.optim + the hooks give the fused trainer's weights,
    outputs and replacements step for step."""
    method = _method(spec, **overrides)
    sizes, seeds = [6, 8, 7, 3], [0, 5]
    kw = dict(loss="cross_entropy", device=torch.device(device), dtype=F64)
    fused, autograd = (
        Learner(sizes, seeds, method, **kw),
        AutogradLearner(sizes, seeds, method, **kw),
    )
    for x, y in _stream(60, 2, 6, 3, device):
        out_f = torch.empty(2, 1, 3, dtype=F64, device=device)
        out_a = torch.empty_like(out_f)
        fused.step(x, y, out=out_f)
        autograd.step(x, y, out=out_a)
        torch.testing.assert_close(out_a, out_f, rtol=1e-10, atol=1e-12)
    for wf, wa in zip(fused.net.weights(), autograd.net.weights(), strict=True):
        torch.testing.assert_close(wa, wf, rtol=1e-10, atol=1e-12)
    assert autograd.units_replaced().tolist() == fused.units_replaced().tolist()
    if method.uses("cbp") or method.uses("redo"):
        assert fused.units_replaced().sum() > 0


def test_autograd_path_squared_error_equals_fused():
    method = _method("cbp", replacement_rate=0.05, maturity_threshold=3)
    sizes, seeds = [4, 5, 1], [2]
    kw = dict(loss="squared_error", activation="tanh", device=torch.device("cpu"), dtype=F64)
    fused, autograd = (
        Learner(sizes, seeds, method, **kw),
        AutogradLearner(sizes, seeds, method, **kw),
    )
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        x = torch.ones(1, 1, 5, dtype=F64)
        x[..., :-1] = torch.randn(1, 1, 4, generator=g, dtype=F64)
        y = torch.randn(1, 1, 1, generator=g, dtype=F64)
        fused.step(x, y)
        autograd.step(x, y)
    for wf, wa in zip(fused.net.weights(), autograd.net.weights(), strict=True):
        torch.testing.assert_close(wa, wf, rtol=1e-10, atol=1e-12)


def test_make_learner_picks_the_fused_trainer_only_for_its_methods():
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    assert type(make_learner([3, 4, 2], [0], _method("cbp+l2"), **kw)) is Learner
    assert uses_fused_trainer(_method("adam+redo+l2"))
    assert uses_fused_trainer(_method("cbp+layer_norm"))
    assert uses_fused_trainer(_method("adam+injection"))  # with L2, S&P and Adam
    assert not uses_fused_trainer(_method("injection+weight_clipping"))
    picked = make_learner([3, 4, 2], [0], _method("injection+weight_clipping"), **kw)
    assert type(picked) is AutogradLearner


def test_parse_methods():
    available = list(DEFAULTS)
    assert parse_methods("cbp+l2_init+layer_norm", available) == ("cbp", "l2_init", "layer_norm")
    for spec, message in [
        ("cbp+nope", "unknown method 'nope'"),
        ("cbp+cbp", "twice"),
        ("bp+cbp", "bp is plain backprop alone"),
        ("cbp+redo", "cbp and redo contradict"),
        ("adam+upgd", "adam and upgd contradict"),
        ("layer_norm+nap", "layer_norm and nap contradict"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_methods(spec, available)


def test_combination_takes_each_methods_defaults():
    m = _method("adam+cbp+l2")
    assert m.optimizer == "adam" and m.lr == DEFAULTS["adam"]["lr"]
    assert m.replacement_rate == DEFAULTS["cbp"]["replacement_rate"]
    assert m.weight_decay == DEFAULTS["l2"]["weight_decay"]
    assert _method("cbp").weight_decay == 0.0


def test_fused_only_methods_are_refused_by_the_autograd_learner():
    """Its network has no dropout (nor online normalisation): refused, whatever they combine
    with."""
    with pytest.raises(UsageError, match="dropout runs only on the fused trainer"):
        AutogradLearner(
            [3, 4, 2],
            [0],
            _method("dropout+layer_norm"),
            loss="cross_entropy",
            device=torch.device("cpu"),
            dtype=F64,
        )


# Every method the autograd learner runs, alone or combined (small settings so that replacing,
# injecting and resetting happen within the test's steps).
AUTOGRAD_METHODS = [
    ("injection", {}),
    ("adam+injection", {"injection_layers": 1}),
    ("l2_init", {"l2_init": 0.1}),
    ("parseval", {}),
    ("soft_snp", {"soft_shrink_perturb": 0.99}),
    ("weight_clipping", {"weight_clipping": 0.8}),
    ("snp_init", {}),
    ("head_reset", {"head_reset": 2}),
    ("adam+adam_reset", {}),
    ("cbp+l2_init+weight_clipping", {"replacement_rate": 0.05, "maturity_threshold": 3}),
    ("adam+redo+parseval+adam_reset", {"redo_period": 4}),
    ("l2+soft_snp+snp_init+head_reset", {"soft_shrink_perturb": 0.9}),
    ("layer_norm", {}),
    ("nap", {}),
    ("crelu", {}),
    ("dff", {}),
    ("cbp+dff+layer_norm", {"replacement_rate": 0.05, "maturity_threshold": 3}),
    ("cbp+l2_init+layer_norm", {"replacement_rate": 0.05, "maturity_threshold": 3}),
    ("adam+redo+crelu+nap", {"redo_period": 4, "redo_threshold": 0.5}),
    ("injection+layer_norm", {"injection_layers": 1}),
    ("upgd", {}),
    ("upgd+cbp+l2", {"replacement_rate": 0.05, "maturity_threshold": 3}),
    ("trac", {}),
    ("adam+trac+redo+adam_reset", {"redo_period": 4, "redo_threshold": 0.5}),
]


def _run(learner, stream, boundary_every: int):
    for t, (x, y) in enumerate(stream):
        if t and t % boundary_every == 0:
            learner.task_boundary()
        learner.step(x, y)


def _assert_same_weights(a, b, seed_a=slice(None), seed_b=slice(None), tol=1e-10):
    for wa, wb in zip(a.net.weights(), b.net.weights(), strict=True):
        torch.testing.assert_close(wa[seed_a], wb[seed_b], rtol=tol, atol=tol)


@pytest.mark.parametrize("spec, overrides", AUTOGRAD_METHODS)
def test_every_method_stacked_seeds_equal_separate_runs(spec, overrides):
    """S stacked seeds follow exactly the S runs alone, across task boundaries."""
    method = _method(spec, **overrides)
    sizes, seeds = [5, 6, 6, 3], [3, 8]
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    stacked = AutogradLearner(sizes, seeds, method, **kw)
    alone = [AutogradLearner(sizes, [s], method, **kw) for s in seeds]
    steps = list(_stream(30, 2, 5, 3, "cpu"))
    _run(stacked, steps, 10)
    for i, learner in enumerate(alone):
        _run(learner, [(x[i : i + 1], y[i : i + 1]) for x, y in steps], 10)
        _assert_same_weights(stacked, learner, seed_a=slice(i, i + 1))
        assert stacked.units_replaced()[i] == learner.units_replaced()[0]


@pytest.mark.parametrize("spec, overrides", AUTOGRAD_METHODS)
def test_every_method_resumes_exactly(spec, overrides):
    """A learner rebuilt from a state dict continues exactly, across task boundaries."""
    method = _method(spec, **overrides)
    sizes, seeds = [5, 6, 6, 3], [1, 2]
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    steps = list(_stream(40, 2, 5, 3, "cpu"))
    first = AutogradLearner(sizes, seeds, method, **kw)
    _run(first, steps[:20], 10)
    state = first.state_dict()
    resumed = AutogradLearner(sizes, seeds, method, **kw)
    resumed.load_state_dict(state)
    for learner in (first, resumed):
        for t, (x, y) in enumerate(steps[20:], start=20):
            if t % 10 == 0:
                learner.task_boundary()
            learner.step(x, y)
    _assert_same_weights(first, resumed, tol=0.0)


@pytest.mark.parametrize(
    "spec", ["cbp+l2_init+weight_clipping", "adam+snp_init+adam_reset", "injection+parseval"]
)
def test_scr_with_combined_methods_resumes_exactly(tmp_path, spec):
    """A run of the benchmark with methods combined, interrupted after a bin and resumed,
    writes the rows of the run that never stopped (task boundaries every 100 examples)."""
    from stacked_runs import read_rows
    from test_supervised import scr_config

    from ppo_cbp.benchmarks.scr import run_scr

    cbp = dict(replacement_rate=0.05, maturity_threshold=5) if "cbp" in spec else {}
    m = MethodConfig(method=spec, **cbp)
    kw = dict(method=m, seeds=[1, 2], change_every=100)
    full = scr_config(tmp_path, "full", **kw)
    summary = run_scr(full)
    assert summary["method"] == spec
    part = scr_config(tmp_path, "part", **kw)
    run_scr(part, stop_after=1)
    part.resume = True
    run_scr(part)
    for seed in (1, 2):
        rows = read_rows(part.out, seed)
        assert rows == read_rows(full.out, seed)
        assert len(rows) == 3


def test_architecture_methods_build_their_networks():
    """layer_norm and nap put a LayerNorm (gain 1, offset 0) after every hidden Linear; crelu
    doubles every consumer's inputs; the step's hidden activations are one per unit."""
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    sizes = [5, 6, 4, 3]
    for spec in ("layer_norm", "nap"):
        learner = AutogradLearner(sizes, [0, 1], _method(spec), **kw)
        norms = learner.module.layer_norms()
        assert [tuple(g.shape) for g, _ in norms] == [(2, 6), (2, 4)]
        assert all(torch.equal(g, torch.ones_like(g)) for g, _ in norms)
    learner = AutogradLearner(sizes, [0, 1], _method("crelu"), **kw)
    assert [tuple(w.shape) for w in learner.net.weights()] == [(2, 6, 5), (2, 4, 12), (2, 3, 8)]
    x, y = next(_stream(1, 2, 5, 3, "cpu"))
    hidden = learner.step(x, y)
    assert [tuple(h.shape) for h in hidden] == [(2, 1, 6), (2, 1, 4)]
    with pytest.raises(UsageError, match="crelu replaces ReLU"):
        AutogradLearner(sizes, [0], _method("crelu"), activation="tanh", **kw)
    with pytest.raises(UsageError, match="--injection-layers 1"):
        AutogradLearner(sizes, [0], _method("injection+layer_norm"), **kw)


def test_scr_hidden_unit_metrics_follow_their_definitions():
    """Dead units (zero on every input) and the effective rank (exp of the entropy of the
    normalised singular values) of the hidden layer, per seed, against numpy."""
    import numpy as np

    from ppo_cbp.benchmarks.scr import hidden_unit_metrics

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 40, 5, generator=g, dtype=F64).clamp_min(0)
    h[0, :, 1] = 0  # seed 0: one dead unit
    h[1, :, 3:] = 0  # seed 1: two

    class Net:
        outputs_per_unit = [1]

        def forward(self, x_aug):
            return None, [h]

    class FakeLearner:
        net = Net()

    rows = hidden_unit_metrics(FakeLearner(), torch.zeros(2, 40, 3), count_dead=True)
    for s, dead in enumerate((1, 2)):
        sv = np.linalg.svd(h[s].numpy(), compute_uv=False)
        q = sv / sv.sum()
        q = q[q > 0]
        assert rows[s]["dead_units"] == dead
        assert rows[s]["effective_rank"] == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-9)
    assert "dead_units" not in hidden_unit_metrics(FakeLearner(), torch.zeros(2, 40, 3), False)[0]
