"""Throughput of the fused stacked-seed trainer against a plain PyTorch baseline, side by side.

Baseline: ``nn.Sequential`` + autograd + ``torch.optim.SGD``, batch 1, one seed (the usual way to
write the online benchmarks). Fused: :class:`ppo_cbp.nets.stacked_mlp.StackedTrainer` with S seeds, with
and without continual backprop (paper's Permuted MNIST setting: adaptable contribution,
eta 0.99, maturity 100, rho 1e-6). All cases run interleaved in rounds so that they see the
same machine load; each number is the median over rounds. Examples/s counts every seed's
examples (S per step).

Online normalization (``--method online_norm``, alpha_f 0.999, alpha_b 0.99) is measured on
the same fused path beside backprop without it; its rows have no target.

Targets (issue 4): width 100 with 8 seeds and CBP >= 6x the baseline; width 2000, one seed,
with CBP >= 1.8x; CBP <= 15% over the same path without it; SCR with 8 seeds >= 5x.

Conv networks (issue 5): images/s of one training step (forward, cross-entropy, backward,
SGD with momentum) of the Continual ImageNet ConvNet (minibatch 100) and of the CIFAR ResNet-18
(minibatch 90), with and without continual backprop at the paper's settings (ConvNet: rho 3e-4,
m 100, adaptable contribution; ResNet: rho 1e-5, m 1000, contribution); CBP <= 10% overhead.

    python scripts/bench_supervised.py [--rounds 5] [--threads 1] [--out docs/bench_supervised.json]
    python scripts/bench_supervised.py --only-conv   # just the conv networks
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ppo_cbp.benchmarks.continual_imagenet import imagenet_convnet
from ppo_cbp.benchmarks.conv_learner import stack_networks
from ppo_cbp.init import init_layer_
from ppo_cbp.nets.resnet import ResNet18
from ppo_cbp.nets.stacked_mlp import StackedMLP, StackedTrainer
from ppo_cbp.plasticity.cbp import ContinualBackprop


def baseline(sizes: list[int], loss: str, lr: float) -> Callable[[int], float]:
    """Returns run(steps) -> seconds for the nn.Sequential + autograd + SGD baseline."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(init_layer_(nn.Linear(a, b), "kaiming_uniform"))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    n = 512
    x = torch.rand(n, 1, sizes[0])
    if loss == "cross_entropy":
        y = torch.randint(0, sizes[-1], (n, 1))
    else:
        y = torch.randn(n, 1, sizes[-1])

    def run(steps: int) -> float:
        t = time.perf_counter()
        for i in range(steps):
            out = net(x[i % n])
            if loss == "cross_entropy":
                value = F.cross_entropy(out, y[i % n])
            else:
                value = F.mse_loss(out, y[i % n])
            opt.zero_grad()
            value.backward()
            opt.step()
        return time.perf_counter() - t

    return run


CONV = {
    # network, batch, classes, lr, weight decay, CBP settings (the paper's)
    "convnet": (
        lambda: imagenet_convnet(2),
        100,
        2,
        0.01,
        0.0,
        dict(
            replacement_rate=3e-4,
            maturity_threshold=100,
            utility="adaptable_contribution",
            init="torch_default",
        ),
    ),
    "resnet18": (
        lambda: ResNet18(100),
        90,
        100,
        0.1,
        5e-4,
        dict(replacement_rate=1e-5, maturity_threshold=1000, utility="contribution"),
    ),
}


def timed(step: Callable[[], object]) -> Callable[[int], float]:
    """run(steps) -> seconds of ``steps`` calls of ``step`` (wall clock)."""

    def run(steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - t

    return run


def fused_step(
    sizes: list[int],
    seeds: int,
    cbp: bool,
    loss: str,
    lr: float,
    online_norm: bool = False,
    device: str | torch.device = "cpu",
) -> Callable[[], None]:
    """One batch-1 step of ``seeds`` stacked MLPs (:class:`StackedTrainer`, + CBP) per call,
    cycling through 512 random examples."""
    norm_decays = (0.999, 0.99) if online_norm else None
    net = StackedMLP(sizes, list(range(seeds)), device=device, norm_decays=norm_decays)
    trainer = StackedTrainer(net, loss=loss, lr=lr)
    op = None
    if cbp:
        op = ContinualBackprop(
            trainer.unit_layers(),
            None,
            replacement_rate=1e-6,
            maturity_threshold=100,
            decay_rate=0.99,
            utility="adaptable_contribution",
            seed=list(range(seeds)),
        )
    n = 512
    x = net.with_ones(torch.rand(seeds, n, sizes[0], device=device))
    if loss == "cross_entropy":
        y = torch.randint(0, sizes[-1], (seeds, n), device=device)
    else:
        y = torch.randn(seeds, n, sizes[-1], device=device)
    out = torch.empty(seeds, n, sizes[-1], device=device)
    calls = itertools.count()

    def step() -> None:
        j = next(calls) % n
        hidden = trainer.step(x[:, j : j + 1], y[:, j : j + 1], out=out[:, j : j + 1])
        if op is not None:
            op.step(hidden, trainer.magnitudes)

    return step


def conv_step(
    kind: str,
    cbp: bool,
    seeds: int = 1,
    device: str | torch.device = "cpu",
    batch: int | None = None,
    side: int = 32,
) -> tuple[Callable[[], None], int]:
    """(step, images per step): one training step (forward, cross-entropy, backward, SGD with
    momentum, CBP) of one ``CONV[kind]`` network, or of ``seeds`` of them stacked as
    ``continual-imagenet`` and ``incremental-cifar`` train them."""
    build, default_batch, classes, lr, wd, settings = CONV[kind]
    batch = batch or default_batch
    torch.manual_seed(0)
    if seeds == 1:
        net = build().to(device)
        layers_or_net, forward = net, lambda x: (net(x), None)
        x = torch.randn(batch, 3, side, side, device=device)
    else:
        net = stack_networks([build() for _ in range(seeds)]).to(device)
        layers_or_net, forward = net.unit_layers(settings.get("init", "kaiming_normal")), net
        x = torch.randn(batch, seeds, 3, side, side, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    op = None
    if cbp:
        op = ContinualBackprop(
            layers_or_net, opt, decay_rate=0.99, seed=list(range(seeds)), **settings
        )
    y = torch.randint(0, classes, (seeds, batch), device=device)

    def step() -> None:
        out, hidden = forward(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.view(-1), reduction="sum")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if op is not None:
            op.step(hidden)

    return step, seeds * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0, help="target time per measurement")
    parser.add_argument("--out", default="docs/bench_supervised.json")
    parser.add_argument("--no-conv", action="store_true", help="skip the conv networks")
    parser.add_argument("--only-conv", action="store_true", help="only the conv networks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mnist = lambda w: [784, w, w, w, 10]  # noqa: E731
    scr = [20, 5, 1]
    cases: dict[str, tuple[Callable[[int], float], int]] = {}
    if not args.only_conv:
        cases = {
            "w100 baseline": (baseline(mnist(100), "cross_entropy", 0.003), 1),
            "w100 fused S=8": (timed(fused_step(mnist(100), 8, False, "cross_entropy", 0.003)), 8),
            "w100 fused S=8 +CBP": (
                timed(fused_step(mnist(100), 8, True, "cross_entropy", 0.003)),
                8,
            ),
            "w100 fused S=8 +online_norm": (
                timed(fused_step(mnist(100), 8, False, "cross_entropy", 0.003, True)),
                8,
            ),
            "w2000 baseline": (baseline(mnist(2000), "cross_entropy", 0.003), 1),
            "w2000 fused S=1": (
                timed(fused_step(mnist(2000), 1, False, "cross_entropy", 0.003)),
                1,
            ),
            "w2000 fused S=1 +CBP": (
                timed(fused_step(mnist(2000), 1, True, "cross_entropy", 0.003)),
                1,
            ),
            "w2000 fused S=1 +online_norm": (
                timed(fused_step(mnist(2000), 1, False, "cross_entropy", 0.003, True)),
                1,
            ),
            "scr baseline": (baseline(scr, "squared_error", 0.01), 1),
            "scr fused S=8": (timed(fused_step(scr, 8, False, "squared_error", 0.01)), 8),
        }
    conv = (
        []
        if args.no_conv
        else ["convnet b100", "convnet b100 +CBP", "resnet18 b90", "resnet18 b90 +CBP"]
    )
    for name in conv:
        step, batch = conv_step(name.split()[0], name.endswith("+CBP"))
        cases[name] = (timed(step), batch)
    steps = {}
    for name, (run, _) in cases.items():  # warm up and size each measurement to ~--seconds
        if name in conv:  # a ResNet step takes about a second on a CPU
            run(2)
            per_step = run(3) / 3
            steps[name] = max(3, int(args.seconds / per_step))
            continue
        run(20)
        per_step = run(50) / 50
        steps[name] = max(20, int(args.seconds / per_step))
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (run, seeds) in cases.items():
            rates[name].append(steps[name] * seeds / run(steps[name]))
    median = {name: statistics.median(r) for name, r in rates.items()}

    def ratio(a: str, b: str) -> float:
        return median[a] / median[b]

    checks = []
    if not args.only_conv:
        checks += [
            ("w100 S=8 +CBP / baseline", ratio("w100 fused S=8 +CBP", "w100 baseline"), 6.0, ">="),
            (
                "w2000 S=1 +CBP / baseline",
                ratio("w2000 fused S=1 +CBP", "w2000 baseline"),
                1.8,
                ">=",
            ),
            (
                "CBP overhead w100 S=8",
                ratio("w100 fused S=8", "w100 fused S=8 +CBP") - 1,
                0.15,
                "<=",
            ),
            (
                "CBP overhead w2000",
                ratio("w2000 fused S=1", "w2000 fused S=1 +CBP") - 1,
                0.15,
                "<=",
            ),
            ("scr S=8 / baseline", ratio("scr fused S=8", "scr baseline"), 5.0, ">="),
            ("w100 S=8 (no CBP) / baseline", ratio("w100 fused S=8", "w100 baseline"), None, ""),
            ("w2000 S=1 (no CBP) / baseline", ratio("w2000 fused S=1", "w2000 baseline"), None, ""),
            (
                "online_norm / bp w100 S=8",
                ratio("w100 fused S=8 +online_norm", "w100 fused S=8"),
                None,
                "",
            ),
            (
                "online_norm / bp w2000 S=1",
                ratio("w2000 fused S=1 +online_norm", "w2000 fused S=1"),
                None,
                "",
            ),
        ]
    if conv:
        checks += [
            ("CBP overhead convnet", ratio("convnet b100", "convnet b100 +CBP") - 1, 0.10, "<="),
            ("CBP overhead resnet18", ratio("resnet18 b90", "resnet18 b90 +CBP") - 1, 0.10, "<="),
        ]
    print(f"{'case':<28} {'examples/s':>12}")
    for name in cases:
        print(f"{name:<28} {median[name]:>12.0f}")
    print()
    print(f"{'check':<32} {'value':>8} {'target':>10}  ok")
    results = []
    for name, value, target, op in checks:
        ok = None if target is None else (value >= target if op == ">=" else value <= target)
        tgt = "" if target is None else f"{op} {target:g}"
        print(f"{name:<32} {value:>8.2f} {tgt:>10}  {'' if ok is None else ok}")
        results.append(dict(check=name, value=value, target=target, op=op, ok=ok))
    report = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "examples_per_second": median,
        "all_rounds": rates,
        "checks": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
