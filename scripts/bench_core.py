"""Cost of one continual-backprop step, and of every other per-step plasticity method, relative
to one training step.

For each network, times (a) forward + backward + optimizer step on a minibatch and (b) the
same followed by ``ContinualBackprop.step()``, interleaved in one run so that both see the same
machine state. Then, per network, each per-step method of :mod:`ppo_cbp.plasticity` the same
way: its hooks (``after_backward`` and ``after_step``) timed after a training step, and the
optimizers (UPGD, TRAC) as the training step with them against the step with the optimizer
they replace or wrap. Prints two tables and writes JSON.

    python scripts/bench_core.py [--repeats 300] [--out docs/bench_core.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from ppo_cbp.init import init_layer_
from ppo_cbp.plasticity.c_chain import ChurnReduction
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.hooks import Layer, Network
from ppo_cbp.plasticity.l2_init import L2Init
from ppo_cbp.plasticity.normalize_project import NormalizeAndProject
from ppo_cbp.plasticity.parseval import ParsevalRegularization
from ppo_cbp.plasticity.shrink_perturb import ShrinkPerturb
from ppo_cbp.plasticity.trac import TRAC
from ppo_cbp.plasticity.upgd import UPGD
from ppo_cbp.plasticity.weight_clipping import WeightClipping

CASES = [
    # name, sizes, optimizer, init, CBP settings
    (
        "MLP 27-256-256-8 (PPO), Adam",
        [27, 256, 256, 8],
        "adam",
        "lecun_uniform",
        dict(utility="contribution"),
    ),
    (
        "MLP 784-2000x3-10, SGD",
        [784, 2000, 2000, 2000, 10],
        "sgd",
        "kaiming_uniform",
        dict(utility="contribution"),
    ),
    (
        "MLP 784-2000x3-10, SGD, adaptable",
        [784, 2000, 2000, 2000, 10],
        "sgd",
        "kaiming_uniform",
        dict(utility="adaptable_contribution"),
    ),
]


def build(sizes, init):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(init_layer_(nn.Linear(a, b), init))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def measure(sizes, optimizer, init, cbp_kwargs, batch, repeats, device):
    torch.manual_seed(0)
    net = build(sizes, init).to(device)
    opt = (
        torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.99, 0.99))
        if optimizer == "adam"
        else torch.optim.SGD(net.parameters(), lr=3e-3)
    )
    # maturity 0 so that replacements happen at the replacement rate from the start
    cbp = ContinualBackprop(
        net, opt, replacement_rate=1e-4, maturity_threshold=0, init=init, **cbp_kwargs
    )
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.randn(batch, sizes[-1], device=device)

    def train_step():
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(10):
        train_step()
        cbp.step()
    plain, with_cbp, cbp_only = [], [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        train_step()
        sync()
        t1 = time.perf_counter()
        train_step()
        sync()
        t2 = time.perf_counter()
        cbp.step()
        sync()
        t3 = time.perf_counter()
        plain.append(t1 - t0)
        with_cbp.append(t3 - t1)
        cbp_only.append(t3 - t2)
    step, cbp_step = statistics.median(plain), statistics.median(cbp_only)
    return {
        "train_step_ms": 1e3 * step,
        "train_step_with_cbp_ms": 1e3 * statistics.median(with_cbp),
        "cbp_step_ms": 1e3 * cbp_step,
        "cbp_over_train_step": cbp_step / step,
        "units_replaced": cbp.num_replaced,
    }


# The per-step methods: name -> a function of the Network that builds the method.
PER_STEP = {
    "L2-Init (lambda 1e-2)": lambda n: L2Init(n, 1e-2),
    "Parseval (lambda 1e-3)": lambda n: ParsevalRegularization(n, 1e-3),
    "weight clipping (kappa 1)": lambda n: WeightClipping(n, 1.0),
    "soft S&P toward a fresh init": lambda n: ShrinkPerturb(n, 0.999999, every="step"),
    "NaP projection": lambda n: NormalizeAndProject(n),
}


class _ChurnStep:
    """C-CHAIN's per-step work: the churn term on a reference batch (forward through the
    current and the previous network, backward into .grad) and the snapshot of the
    parameters after the step."""

    def __init__(self, net: nn.Module, x: torch.Tensor):
        self.churn, self.x = ChurnReduction(net, skip_steps=1), x
        self.churn.after_step()

    def after_backward(self) -> None:
        with torch.enable_grad():
            self.churn.loss(self.x).backward()

    def after_step(self, hidden) -> None:
        self.churn.after_step()


METHOD_CASES = [CASES[0], CASES[1]]


def network_of(net: nn.Sequential, opt, init: str) -> Network:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    layers = [
        Layer(m.weight, m.bias, init, "relu", head=i == len(linears) - 1)
        for i, m in enumerate(linears)
    ]
    return Network(layers, list(net.parameters()), opt)


def measure_methods(sizes, optimizer, init, batch, repeats, device):
    """Per method of :data:`PER_STEP`: its hooks' time after a training step, over the step's."""
    torch.manual_seed(0)
    net = build(sizes, init).to(device)
    opt = (
        torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.99, 0.99))
        if optimizer == "adam"
        else torch.optim.SGD(net.parameters(), lr=3e-3)
    )
    network = network_of(net, opt, init)
    methods = {name: make(network) for name, make in PER_STEP.items()}
    x = torch.randn(batch, sizes[0], device=device)
    methods["C-CHAIN churn term"] = _ChurnStep(net, torch.randn_like(x))
    y = torch.randn(batch, sizes[-1], device=device)

    def train_step():
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in ["train step", *methods]}
    for r in range(repeats + 10):
        sync()
        t0 = time.perf_counter()
        train_step()
        sync()
        if r >= 10:
            times["train step"].append(time.perf_counter() - t0)
        for name, m in methods.items():
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                m.after_backward()
                m.after_step(())
            sync()
            if r >= 10:
                times[name].append(time.perf_counter() - t0)
    step = statistics.median(times["train step"])
    rows = {
        name: {
            "train_step_ms": 1e3 * step,
            "method_ms": 1e3 * statistics.median(times[name]),
            "method_over_train_step": statistics.median(times[name]) / step,
        }
        for name in methods
    }
    upgd = UPGD(net.parameters(), lr=1e-4, weight_decay=1e-4, beta_utility=0.999, sigma=1e-3)
    rows["UPGD instead of the optimizer"] = measure_optimizer(net, opt, upgd, x, y, repeats, sync)
    trac = TRAC(type(opt)(net.parameters(), **opt.defaults))
    rows["TRAC around the optimizer"] = measure_optimizer(net, opt, trac, x, y, repeats, sync)
    return rows


def measure_optimizer(net, opt, upgd, x, y, repeats, sync) -> dict[str, float]:
    """A training step with optimizer ``upgd`` against one with ``opt``, interleaved on the
    same network."""

    def train_step(optimizer):
        loss = (net(x) - y).pow(2).mean()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

    base, other = [], []
    for r in range(repeats + 10):
        for optimizer, out in ((opt, base), (upgd, other)):
            sync()
            t0 = time.perf_counter()
            train_step(optimizer)
            sync()
            if r >= 10:
                out.append(time.perf_counter() - t0)
    step, with_upgd = statistics.median(base), statistics.median(other)
    return {
        "train_step_ms": 1e3 * step,
        "method_ms": 1e3 * (with_upgd - step),
        "method_over_train_step": (with_upgd - step) / step,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="docs/bench_core.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, sizes, optimizer, init, cbp_kwargs in CASES:
        r = measure(sizes, optimizer, init, cbp_kwargs, args.batch, args.repeats, args.device)
        rows.append({"network": name, **r})
    print(
        f"minibatch {args.batch}, {args.threads} thread(s), device {args.device}, median of {args.repeats}"
    )
    print(f"{'network':34s} {'train step ms':>14s} {'CBP step ms':>12s} {'CBP / step':>11s}")
    for r in rows:
        print(
            f"{r['network']:34s} {r['train_step_ms']:14.3f} {r['cbp_step_ms']:12.3f} {100 * r['cbp_over_train_step']:10.1f}%"
        )
    method_rows = []
    for name, sizes, optimizer, init, _ in METHOD_CASES:
        batch = 64 if optimizer == "adam" else args.batch
        r = measure_methods(sizes, optimizer, init, batch, args.repeats, args.device)
        for method, row in r.items():
            method_rows.append({"network": f"{name}, batch {batch}", "method": method, **row})
    print()
    print(f"{'network':42s} {'method':30s} {'step ms':>9s} {'method ms':>10s} {'/ step':>7s}")
    for r in method_rows:
        print(
            f"{r['network']:42s} {r['method']:30s} {r['train_step_ms']:9.3f} "
            f"{r['method_ms']:10.3f} {100 * r['method_over_train_step']:6.1f}%"
        )
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    with open(args.out, "w") as f:
        json.dump(
            {"config": vars(args), "meta": meta, "results": rows, "methods": method_rows},
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
