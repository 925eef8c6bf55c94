"""The method suite (:mod:`ppo_cbp.plasticity.suite`) as the trainers build it, against a
reference written from the methods' definitions (float64).

The reference (:class:`Reference`) applies one training step's methods in the suite's
documented order to its own copy of a tiny MLP, each from its docstring's formula, without
calling the operators:

* after the backward pass: L2-Init ``grad += lambda (theta - theta_0)`` on every parameter,
  then Parseval ``grad_W += 4 lambda (W W^T - s I) W`` on the hidden layers (``s`` the
  squared gain of the init scheme: 2 for Kaiming with ReLU, 1 for LeCun);
* the optimizer step: ``theta -= lr * grad`` (done by the test on both sides), or
  ``torch.optim.Adam`` with the same settings on both sides where ``adam_reset`` needs Adam;
* after the step: S&P noise ``theta += sigma * xi`` (``xi`` drawn parameter by parameter in the
  network's parameter order from the noise generator), soft S&P ``W <- alpha W + (1 - alpha)
  W_fresh``, ``b <- alpha b`` (``W_fresh`` a new draw of every weight layer, input side first,
  from stream ``TAG_SHRINK_PERTURB``), NaP ``W <- W ||W_0||_F / ||W||_F`` on every weight and
  ``(gain, offset)`` jointly to their initial norm, the unit reset (below), weight clipping
  ``clamp(theta, -kappa b_l, kappa b_l)`` on every weight and bias (``b_l`` the layer's uniform
  init bound), and C-CHAIN's copy of the parameters (its churn term enters the reference's
  loss: ``lambda * mean((f(s) - f_{theta_{t-1}}(s))^2)``, from the third step after a (re)start);
* at a task boundary: S&P toward a fresh init (its own ``TAG_SHRINK_PERTURB`` stream), head
  reset (the last ``head_reset`` layers redrawn from ``TAG_LAYER_RESET``, biases 0, their
  optimizer state zeroed), Adam's moments and step count zeroed, C-CHAIN's restart.

CBP and ReDo choose units from running statistics; the reference runs the SAME operator
(``ContinualBackprop`` / ``ReDo`` with the suite's settings and seed) alone on the reference's
own tensors at its position in the order, so the matrix checks that every other method composes
around it as defined. :func:`test_cbp_without_replacements_only_updates_utilities` checks the
hand-computable case: with replacement rate 0, CBP leaves the weights to the other methods.

Plasticity injection needs the module's regrouping machinery and is checked by properties
from its definition (:func:`test_injection_combinations`).
"""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ppo_cbp.benchmarks import scr
from ppo_cbp.benchmarks.autograd_learner import AutogradLearner
from ppo_cbp.benchmarks.common import Learner, MethodConfig, resolve_method
from ppo_cbp.errors import UsageError
from ppo_cbp.init import distribution
from ppo_cbp.plasticity import suite
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.injection import InjectableNetwork
from ppo_cbp.plasticity.normalize_project import layer_norm_mlp, layer_norms
from ppo_cbp.plasticity.redo import ReDo
from ppo_cbp.ppo.agent import make_mlp, network_of
from ppo_cbp.seeding import TAG_LAYER_RESET, TAG_SHRINK_PERTURB, derive_seed

F64 = torch.float64
SIZES = (5, 4, 3, 2)
SEED = 7
NOISE_SEED = 123
BATCH = 8
SGD_LR = 0.1
ADAM_LR = 0.02
TOL = 1e-12
CHURN_COEFFICIENT = 1.0  # C-CHAIN's lambda, set on the suite's ChurnReduction (no end_update here)
CHURN_SKIP = 2  # ChurnReduction's skip_steps
TASKS = (3, 3, 2)  # steps per task, a task boundary between two tasks
PARSEVAL_SCALE = {"kaiming_uniform": 2.0, "lecun_uniform": 1.0}  # gain(relu)^2, LeCun's 1
INITS = ("kaiming_uniform", "lecun_uniform")
SETTINGS = dict(
    l2_init=0.05,
    parseval=0.02,
    noise_std=1e-2,
    soft_shrink_perturb=0.9,
    replacement_rate=0.3,
    maturity_threshold=1,
    decay_rate=0.9,
    utility="contribution",
    redo_threshold=0.5,
    redo_period=2,
    weight_clipping=0.8,
    shrink_perturb_init=0.6,
    head_reset=2,
)


# --- the network and its data -----------------------------------------------------------------
def make_net(names, init: str) -> nn.Sequential:
    """The tiny MLP as PPO's builders draw it (LayerNorm after every hidden Linear for
    ``layer_norm`` and ``nap``), in float64."""
    layer_norm = bool({"layer_norm", "nap"} & set(names))
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        build = layer_norm_mlp if layer_norm else make_mlp
        return build(SIZES[0], list(SIZES[1:-1]), SIZES[-1], init).to(F64)


def forward(net: nn.Sequential, x):
    """The output and every hidden layer's activation (after its ReLU)."""
    hidden = []
    for m in net:
        x = m(x)
        if isinstance(m, nn.ReLU):
            hidden.append(x)
    return x, hidden


def batches(steps: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, SIZES[0], generator=g, dtype=F64),
            torch.randn(BATCH, SIZES[-1], generator=g, dtype=F64),
        )
        for _ in range(steps)
    ]


X_REF = torch.randn(BATCH, SIZES[0], generator=torch.Generator().manual_seed(9), dtype=F64)


def uses_adam(names) -> bool:
    return "adam_reset" in names


class SuiteRun:
    """The method suite on the MLP, as ``ppo_cbp/ppo/agent.py`` builds it: one Target over an
    ``nn.Sequential`` (seed_dims 0), :func:`suite.build`, and the trainer's step."""

    def __init__(self, names, init: str, settings=SETTINGS, injection_layers: int | None = None):
        self.names = set(names)
        self.net = make_net(names, init)
        self.module: nn.Module = self.net
        if injection_layers is not None:
            self.module = InjectableNetwork(self.net, head_layers=injection_layers)
        params = list(self.module.parameters())
        if uses_adam(names):
            self.opt = torch.optim.Adam(params, lr=ADAM_LR, foreach=False)
        else:
            self.opt = torch.optim.SGD(params, lr=SGD_LR)
        self.network = network_of(self.module, self.opt, init, SEED)
        target = suite.Target(
            "",
            self.network,
            module=self.module,
            units=self.net if injection_layers is None else None,
            unit_seeds=SEED,
            norms=layer_norms(self.net) if "nap" in self.names else None,
            churn="c_chain" in self.names,
        )
        self.suite = suite.build(
            names,
            settings,
            [target],
            init=init,
            noise_generators=[torch.Generator().manual_seed(NOISE_SEED)],
        )
        churn = self.suite.churn
        if churn is not None:  # its default lambda, 100, diverges at this step size
            churn.initial_coefficient = CHURN_COEFFICIENT
            churn.coefficient.fill_(CHURN_COEFFICIENT)

    def loss(self, x, y):
        if isinstance(self.module, InjectableNetwork):
            out, hidden = self.module(x), []
        else:
            out, hidden = forward(self.net, x)
        loss = F.mse_loss(out, y)
        if self.suite.churn is not None:
            loss = loss + self.suite.churn.loss(X_REF)
        return loss, hidden

    def backward(self, x, y):
        loss, hidden = self.loss(x, y)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        return [h.detach() for h in hidden]

    @torch.no_grad()
    def update(self, hidden, check_grads=None):
        self.suite.after_backward()
        if check_grads is not None:
            check_grads()
        if uses_adam(self.names):
            self.opt.step()
        else:
            for p in self.network.parameters:
                p.sub_(SGD_LR * p.grad)
        self.suite.after_step(hidden)

    def step(self, x, y):
        self.update(self.backward(x, y))

    def boundary(self):
        with torch.no_grad():
            self.suite.at_task_boundary()

    def parameters(self):
        return list(self.module.parameters())


# --- the reference ----------------------------------------------------------------------------
def fresh(shape, init: str, generator):
    """A new draw of a weight of ``shape`` from ``init`` with ReLU's gain (PPO's builders draw
    every layer so), by the scheme's definition."""
    kind, scale = distribution(init, "relu", shape[1], shape[0])
    if kind == "uniform":
        return torch.rand(shape, generator=generator, dtype=F64) * (2 * scale) - scale
    return torch.randn(shape, generator=generator, dtype=F64) * scale


def stream(tag: int):
    return torch.Generator().manual_seed(derive_seed(SEED, tag))


class Reference:
    """One training step's methods from their definitions, on the reference's own MLP."""

    def __init__(self, names, init: str, settings=SETTINGS, unit_reset: bool = True):
        self.names = set(names)
        self.init = init
        self.s = dict(settings)
        self.module = make_net(names, init)
        self.linears = [m for m in self.module if isinstance(m, nn.Linear)]
        self.norms = [m for m in self.module if isinstance(m, nn.LayerNorm)]
        self.params = list(self.module.parameters())
        with torch.no_grad():
            self.theta0 = [p.clone() for p in self.params]
            self.weight_norms0 = [lin.weight.square().sum().sqrt() for lin in self.linears]
            self.norm_norms0 = [
                (ln.weight.square().sum() + ln.bias.square().sum()).sqrt() for ln in self.norms
            ]
        self.opt = (
            torch.optim.Adam(self.params, lr=ADAM_LR, foreach=False) if uses_adam(names) else None
        )
        self.noise = torch.Generator().manual_seed(NOISE_SEED)
        self.soft_stream = stream(TAG_SHRINK_PERTURB)
        self.boundary_stream = stream(TAG_SHRINK_PERTURB)
        self.reset_stream = stream(TAG_LAYER_RESET)
        # CBP's and ReDo's choice of units: the same operator, alone, on these tensors
        self.resetter = None
        common = dict(init=init, reset_optimizer_state=True, seed=SEED)
        if "cbp" in self.names and unit_reset:
            self.resetter = ContinualBackprop(
                self.module,
                self.opt,
                replacement_rate=self.s["replacement_rate"],
                maturity_threshold=self.s["maturity_threshold"],
                decay_rate=self.s["decay_rate"],
                utility=self.s["utility"],
                **common,
            )
        elif "redo" in self.names and unit_reset:
            self.resetter = ReDo(
                self.module,
                self.opt,
                threshold=self.s["redo_threshold"],
                period=self.s["redo_period"],
                **common,
            )
        if self.resetter is not None:
            self.resetter.remove_hooks()
        self.snapshots = [self.snapshot()]
        self.churn_steps = 0

    def snapshot(self):
        return {n: t.detach().clone() for n, t in self.module.state_dict().items()}

    def bounds(self):
        return [
            self.s["weight_clipping"]
            * distribution(self.init, "relu", lin.in_features, lin.out_features)[1]
            for lin in self.linears
        ]

    @torch.no_grad()
    def shrink(self, alpha: float, generator):
        for lin in self.linears:
            w_fresh = fresh(tuple(lin.weight.shape), self.init, generator)
            lin.weight.copy_(alpha * lin.weight + (1 - alpha) * w_fresh)
            lin.bias.copy_(alpha * lin.bias)

    def step(self, x, y):
        out, hidden = forward(self.module, x)
        loss = F.mse_loss(out, y)
        if "c_chain" in self.names and self.churn_steps >= CHURN_SKIP:
            with torch.no_grad():
                before = functional_call(self.module, self.snapshots[-2], (X_REF,))
            churn = (self.module(X_REF) - before).square().mean()
            loss = loss + CHURN_COEFFICIENT * churn
        grads = torch.autograd.grad(loss, self.params)
        n = self.names
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.grad = g.clone()
            if "l2_init" in n:
                for p, p0 in zip(self.params, self.theta0):
                    p.grad = p.grad + self.s["l2_init"] * (p - p0)
            if "parseval" in n:
                scale = PARSEVAL_SCALE[self.init]
                for lin in self.linears[:-1]:
                    w = lin.weight
                    residual = w @ w.T - scale * torch.eye(w.shape[0], dtype=F64)
                    w.grad = w.grad + 4 * self.s["parseval"] * residual @ w
            if self.opt is not None:
                self.opt.step()
            else:
                for p in self.params:
                    p.sub_(SGD_LR * p.grad)
            if "snp" in n:
                for p in self.params:
                    xi = torch.randn(p.shape, generator=self.noise, dtype=F64)
                    p.copy_(p + self.s["noise_std"] * xi)
            if "soft_snp" in n:
                self.shrink(self.s["soft_shrink_perturb"], self.soft_stream)
            if "nap" in n:
                for lin, n0 in zip(self.linears, self.weight_norms0):
                    lin.weight.mul_(n0 / lin.weight.square().sum().sqrt())
                for ln, n0 in zip(self.norms, self.norm_norms0):
                    norm = (ln.weight.square().sum() + ln.bias.square().sum()).sqrt()
                    ln.weight.mul_(n0 / norm)
                    ln.bias.mul_(n0 / norm)
            if self.resetter is not None:
                self.resetter.after_step([h.detach() for h in hidden])
            if "weight_clipping" in n:
                for lin, c in zip(self.linears, self.bounds()):
                    lin.weight.clamp_(-c, c)
                    lin.bias.clamp_(-c, c)
            if "c_chain" in n:
                self.snapshots.append(self.snapshot())
                self.churn_steps += 1

    @torch.no_grad()
    def boundary(self):
        n = self.names
        if "snp_init" in n:
            self.shrink(self.s["shrink_perturb_init"], self.boundary_stream)
        if "head_reset" in n:
            for lin in self.linears[len(self.linears) - self.s["head_reset"] :]:
                lin.weight.copy_(fresh(tuple(lin.weight.shape), self.init, self.reset_stream))
                lin.bias.zero_()
                if self.opt is not None:
                    for t in (lin.weight, lin.bias):
                        for v in self.opt.state.get(t, {}).values():
                            v.zero_()
        if "adam_reset" in n:
            for state in self.opt.state.values():
                for v in state.values():
                    v.zero_()
        if "c_chain" in n:
            self.snapshots = [self.snapshot()]
            self.churn_steps = 0


def assert_same(run: SuiteRun, ref: Reference, when: str):
    for (name, a), b in zip(run.net.named_parameters(), ref.params, strict=True):
        torch.testing.assert_close(
            a, b, rtol=TOL, atol=TOL, msg=lambda m, name=name: f"{name} {when}: {m}"
        )


# --- the combinations ---------------------------------------------------------------------------
def allowed(names) -> bool:
    try:
        suite.check_combination(names)
    except UsageError:
        return False
    return True


HOOKED = [n for n in suite.ORDER if n != "injection"]
PAIRS = [p for p in itertools.combinations(HOOKED, 2) if allowed(p)]
README = [
    ("cbp", "l2_init", "layer_norm"),
    ("l2_init", "parseval", "weight_clipping"),
    ("soft_snp", "snp_init"),
    ("head_reset", "adam_reset", "cbp"),
    ("snp", "l2_init"),
]
COMBINATIONS = [
    pytest.param(names, INITS[i % 2], id="+".join(names) + f"-{INITS[i % 2]}")
    for i, names in enumerate(PAIRS + README)
]


def test_check_combination_refuses_exactly_the_contradictions():
    contradictions = {pair for pair, _ in suite.CONTRADICTIONS}
    for pair in itertools.combinations(suite.METHODS, 2):
        assert allowed(pair) == (frozenset(pair) not in contradictions), pair
    assert len(PAIRS) == math.comb(len(HOOKED), 2) - sum(p <= set(HOOKED) for p in contradictions)


def run_against_reference(names, init, settings=SETTINGS, unit_reset=True):
    run = SuiteRun(names, init, settings)
    ref = Reference(names, init, settings, unit_reset=unit_reset)
    assert_same(run, ref, "at build")
    data = iter(batches(sum(TASKS)))
    for task, steps in enumerate(TASKS):
        if task:
            run.boundary()
            ref.boundary()
            assert_same(run, ref, f"at boundary {task}")
            if "adam_reset" in names:  # moments and step count of every parameter zeroed
                for p in run.parameters():
                    assert all(not v.any() for v in run.opt.state[p].values())
        for t in range(steps):
            x, y = next(data)
            run.step(x, y)
            ref.step(x, y)
            assert_same(run, ref, f"after step {t} of task {task}")
    if "c_chain" in names:
        assert run.suite.churn.steps == ref.churn_steps == TASKS[-1]
        assert run.suite.churn.active
    return run, ref


@pytest.mark.parametrize("names, init", COMBINATIONS)
def test_suite_equals_reference(names, init):
    """Every allowed pair of the suite's hooked methods, and the README combinations: the
    parameters after every step and every task boundary are those of the reference."""
    run, _ = run_against_reference(names, init)
    if "cbp" in names or "redo" in names:
        assert run.suite.units_replaced()[""] > 0


CBP_PAIRS = [
    pytest.param(names, INITS[i % 2], id="+".join(names))
    for i, names in enumerate(p for p in PAIRS + README if "cbp" in p)
]


@pytest.mark.parametrize("names, init", CBP_PAIRS)
def test_cbp_without_replacements_only_updates_utilities(names, init):
    """With replacement rate 0, CBP changes no weight: the suite equals the reference without
    any unit reset."""
    settings = dict(SETTINGS, replacement_rate=0.0)
    run, _ = run_against_reference(names, init, settings, unit_reset=False)
    cbp = run.suite.resetters[""]
    assert cbp.num_replaced == 0
    assert any(u.abs().sum() > 0 for u in cbp.utility)


# --- the order ----------------------------------------------------------------------------------
def test_weight_clipping_comes_after_cbps_redraws():
    """cbp+weight_clipping with kappa 0.5 and every unit replaced every step: every weight and
    bias is within kappa times its layer's init bound after each step (CBP's redraws from
    U(-b, b) are clipped), while CBP alone leaves redrawn weights beyond it."""
    kappa, init = 0.5, "kaiming_uniform"
    settings = dict(SETTINGS, weight_clipping=kappa, replacement_rate=1.0, maturity_threshold=0)
    both = SuiteRun(("cbp", "weight_clipping"), init, settings)
    alone = SuiteRun(("cbp",), init, settings)
    linears = [m for m in both.net if isinstance(m, nn.Linear)]
    bounds = [kappa * distribution(init, "relu", m.in_features, m.out_features)[1] for m in linears]
    replaced = 0
    beyond = False
    for x, y in batches(6):
        both.step(x, y)
        alone.step(x, y)
        now = both.suite.units_replaced()[""]
        assert now - replaced == sum(SIZES[1:-1])  # every hidden unit, every step
        replaced = now
        for m, c in zip(linears, bounds):
            assert m.weight.abs().max() <= c and m.bias.abs().max() <= c
        alone_linears = [m for m in alone.net if isinstance(m, nn.Linear)]
        beyond |= any(m.weight.abs().max() > c for m, c in zip(alone_linears, bounds))
    assert beyond


# --- plasticity injection: properties ---------------------------------------------------------
INJECTION_PARTNERS = [n for n in HOOKED if allowed(("injection", n))]


def frozen_values(module: InjectableNetwork):
    return [t.detach().clone() for t in module.frozen_parameters()]


@pytest.mark.parametrize(
    "partner",
    INJECTION_PARTNERS,
)
def test_injection_combinations(partner):
    """injection+X, by the definitions: right after the injection the output is that of the
    network without the branch (the branch and its frozen copy cancel exactly); the frozen
    head ``theta`` and copy ``theta'_0`` never change after it; and X acts on the trainable
    branch ``theta'`` as on the layers it replaced (the suite's "each method reads its
    network's current layers and parameters when it acts"): L2-Init pulls ``theta'`` toward its
    value at injection (``theta'_0``), Parseval regularises the branch's hidden layer, NaP
    holds each branch weight at its norm at injection, clipping bounds it, and C-CHAIN's churn
    is that of the whole network, branch included."""
    init = "kaiming_uniform"
    names = ("injection", partner)
    head_layers = 1 if partner == "nap" else 2
    run = SuiteRun(names, init, injection_layers=head_layers)
    module = run.module
    data = iter(batches(10))
    for _ in range(3):
        run.step(*next(data))
    run.boundary()
    assert module.injections == 1
    with torch.no_grad():
        assert torch.equal(module(X_REF), module.net(X_REF))
    frozen = frozen_values(module)
    branch = module.trainable[-1].layers()
    branch0 = module.frozen[-1].layers()
    kappa = SETTINGS["weight_clipping"]
    head_linears = [m for m in module.net if isinstance(m, nn.Linear)][-head_layers:]
    bounds = [
        kappa * distribution(init, "relu", m.in_features, m.out_features)[1] for m in head_linears
    ]
    norms0 = [w.detach().square().sum().sqrt() for w, _ in branch0]
    history = [copy.deepcopy(module)]
    failures = []
    for k in range(5):
        x, y = next(data)
        if partner == "c_chain" and k >= CHURN_SKIP:
            with torch.no_grad():
                want = (module(X_REF) - history[-2](X_REF)).square().mean() * CHURN_COEFFICIENT
                got = run.suite.churn.loss(X_REF)
            if not torch.allclose(got, want, rtol=1e-10, atol=0):
                failures.append(f"churn {got.item()} != {want.item()} at step {k}")
        hidden = run.backward(x, y)
        raw = [[t.grad.clone() for t in wb if t is not None] for wb in branch]

        def check_grads(raw=raw, k=k):
            for (w, b), (w0, b0), (gw, gb), j in zip(branch, branch0, raw, range(head_layers)):
                want_w, want_b = gw, gb
                if partner == "l2_init":
                    want_w = gw + SETTINGS["l2_init"] * (w - w0)
                    want_b = gb + SETTINGS["l2_init"] * (b - b0)
                if partner == "parseval" and j < head_layers - 1:
                    residual = w @ w.T - PARSEVAL_SCALE[init] * torch.eye(w.shape[0], dtype=F64)
                    want_w = gw + 4 * SETTINGS["parseval"] * residual @ w
                if not (
                    torch.allclose(w.grad, want_w, rtol=0, atol=TOL)
                    and torch.allclose(b.grad, want_b, rtol=0, atol=TOL)
                ):
                    failures.append(f"{partner}'s gradient misses branch layer {j} at step {k}")

        run.update(hidden, check_grads)
        history.append(copy.deepcopy(module))
        if partner == "weight_clipping":
            for (w, b), c in zip(branch, bounds):
                if w.abs().max() > c or b.abs().max() > c:
                    failures.append(f"branch beyond kappa * bound after step {k}")
        if partner == "nap":
            for (w, _), n0 in zip(branch, norms0):
                if not torch.allclose(w.detach().square().sum().sqrt(), n0, rtol=1e-12, atol=0):
                    failures.append(f"branch weight not at its norm at injection after step {k}")
        for a, b in zip(frozen_values(module), frozen, strict=True):
            if not torch.equal(a, b):
                failures.append(f"a frozen tensor changed at step {k}")
                break
    assert not failures, failures


# --- stacked seeds through the builder --------------------------------------------------------
def autograd_method(spec: str, **overrides):
    return resolve_method(MethodConfig(method=spec, **overrides), scr.DEFAULTS)


def stacked_stream(steps: int, S: int, n_in: int, n_out: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.ones(S, 2, n_in + 1, dtype=F64)
        x[..., :-1] = torch.randn(S, 2, n_in, generator=g, dtype=F64)
        yield x, torch.randn(S, 2, n_out, generator=g, dtype=F64)


def run_learner(learner, steps, boundary_every: int = 5):
    for t, (x, y) in enumerate(steps):
        if t and t % boundary_every == 0:
            learner.task_boundary()
        learner.step(x, y)


@pytest.mark.parametrize(
    "spec, overrides",
    [
        ("snp+l2_init", dict(noise_std=1e-2, l2_init=0.1)),
        (
            "cbp+weight_clipping",
            dict(replacement_rate=0.1, maturity_threshold=2, weight_clipping=0.8),
        ),
        ("adam+nap+adam_reset", {}),
        ("parseval+soft_snp+snp_init+head_reset", dict(soft_shrink_perturb=0.9, head_reset=2)),
    ],
)
def test_stacked_seeds_equal_each_seed_alone(spec, overrides):
    """The suite on a StackedSequential of 2 seeds (seed_dims 1, as the autograd learner builds
    it) gives each seed, bit for bit, the weights of that seed run alone, over 20 steps with a
    task boundary every 5."""
    method = autograd_method(spec, **overrides)
    sizes, seeds = [5, 6, 4, 2], [3, 8]
    kw = dict(loss="squared_error", device=torch.device("cpu"), dtype=F64)
    stacked = AutogradLearner(sizes, seeds, method, **kw)
    steps = list(stacked_stream(20, 2, 5, 2))
    run_learner(stacked, steps)
    if method.uses("cbp"):
        assert stacked.units_replaced().min() > 0
    for i, s in enumerate(seeds):
        alone = AutogradLearner(sizes, [s], method, **kw)
        run_learner(alone, [(x[i : i + 1], y[i : i + 1]) for x, y in steps])
        for a, b in zip(stacked.net.weights(), alone.net.weights(), strict=True):
            assert torch.equal(a[i : i + 1], b)
        for a, b in zip(stacked.params, alone.params, strict=True):
            assert torch.equal(a[i : i + 1], b)


# --- state round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "names",
    [
        ("snp", "soft_snp", "cbp"),
        ("l2_init", "snp_init", "head_reset"),
        ("nap", "redo", "c_chain"),
        ("parseval", "weight_clipping", "adam_reset"),
    ],
    ids="+".join,
)
def test_suite_state_round_trip_continues_exactly(names):
    """Build, run 5 steps (a task boundary after 3), save the network, optimizer and
    ``Suite.state_dict()``; build afresh, load, and run 6 more (a boundary after 3): the run
    equals the uninterrupted one bit for bit."""
    init = "kaiming_uniform"
    data = batches(11)

    def go(run, span):
        for t in span:
            if t in (3, 8):
                run.boundary()
            run.step(*data[t])

    whole = SuiteRun(names, init)
    go(whole, range(11))
    first = SuiteRun(names, init)
    go(first, range(5))
    saved = copy.deepcopy(
        {
            "net": first.net.state_dict(),
            "opt": first.opt.state_dict(),
            "suite": first.suite.state_dict(),
        }
    )
    go(first, range(5, 7))  # the saved state is a copy: running on does not change it
    resumed = SuiteRun(names, init)
    resumed.net.load_state_dict(saved["net"])
    resumed.opt.load_state_dict(saved["opt"])
    resumed.suite.load_state_dict(saved["suite"])
    go(resumed, range(5, 11))
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    if "redo" in names or "cbp" in names:
        assert whole.suite.units_replaced() == resumed.suite.units_replaced()


# --- snp with a regulariser ------------------------------------------------------------------------
def test_scr_snp_with_l2_init_adds_its_noise(tmp_path):
    """``scr --method snp+l2_init``: the noise is applied (noise_std 1e-2 and 0 end with different
    weights) and the rest of the step is the same (at noise 0 the run is l2_init on SGD with
    snp's weight decay)."""

    def weights(name, spec, **method):
        cfg = scr.SCRConfig(
            seeds=[1, 2],
            method=MethodConfig(method=spec, **method),
            examples=120,
            bin_size=60,
            chunk=60,
            change_every=40,
            out=tmp_path / name,
            device="cpu",
            progress=False,
            dtype="float64",
        )
        scr.run_scr(cfg)
        learner = torch.load(cfg.out / "checkpoint.pt", weights_only=False)["learner"]
        return dict(enumerate(learner["net"]["params"]))  # the fused learner's [W | b]

    noisy = weights("noisy", "snp+l2_init", noise_std=1e-2)
    quiet = weights("quiet", "snp+l2_init", noise_std=0.0)
    plain = weights("plain", "l2_init", weight_decay=1e-2)
    assert noisy.keys() == quiet.keys() == plain.keys()
    for k in noisy:
        assert not torch.equal(noisy[k], quiet[k]), k
        torch.testing.assert_close(quiet[k], plain[k], rtol=0, atol=1e-13)


def test_autograd_snp_equals_fused_snp_with_noise():
    """``snp`` (noise 1e-3) on the autograd learner, through the suite's PerturbNoise, equals
    the fused learner's hand-written step, 2 seeds, 30 steps, float64."""
    method = autograd_method("snp", noise_std=1e-3)
    sizes, seeds = [6, 8, 7, 3], [0, 5]
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    fused, autograd = (
        Learner(sizes, seeds, method, **kw),
        AutogradLearner(sizes, seeds, method, **kw),
    )
    g = torch.Generator().manual_seed(1)
    start = [w.clone() for w in fused.net.weights()]
    for _ in range(30):
        x = torch.ones(2, 1, 7, dtype=F64)
        x[..., :-1] = torch.randn(2, 1, 6, generator=g, dtype=F64)
        y = torch.randint(0, 3, (2, 1), generator=g)
        out_f, out_a = torch.empty(2, 1, 3, dtype=F64), torch.empty(2, 1, 3, dtype=F64)
        fused.step(x, y, out=out_f)
        autograd.step(x, y, out=out_a)
        torch.testing.assert_close(out_a, out_f, rtol=0, atol=1e-10)
    for w0, wf, wa in zip(start, fused.net.weights(), autograd.net.weights(), strict=True):
        torch.testing.assert_close(wa, wf, rtol=0, atol=1e-10)
        assert not torch.equal(wf, w0)
