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

Every method (``--methods``): steps per second of each method of the MLP benchmarks alone (with
its benchmark's defaults), plus ``adam+adam_reset``, ``adam+trac`` and the README's
combinations, on Permuted MNIST's network at batch 1 (widths 100 and 2,000) and on
Slowly-Changing Regression's 20-5-1 network, each against the fused trainer's plain SGD step
(``bp``) on the same network, seeds and device, interleaved in rounds. Targets: Permuted MNIST
>= 50% of ``bp``'s steps/s, SCR >= 25%. A method whose definition needs arithmetic beyond the
training step is also held to 50% of the step plus that arithmetic, timed at the rates this run
measures: Parseval's ``2 out^2 in`` multiply-adds per regularised layer, plasticity injection's
the doubled fan-in of every layer after a CReLU or DFF layer (its added weights read by the
forward and backward pass and updated), two frozen heads after its first injection (their forward and, below the input layer, the
gradient through them; the step is measured after one injection, and each further one adds
two heads' width) and Kron's
preconditioner (``2 (out^2 in + out in^2)`` to apply it to a weight matrix, ``out^3 + in^3`` to
update its factors, which kron_torch does at every one of the first 500 steps) at
``torch.bmm``'s rate; Adam's two moments (three elementwise passes over the parameters: each moment, then the
update) and TRAC's own two (its inner product ``<theta - theta_ref, g>`` and the rescaled
update ``theta_ref + (Delta + u) s``) at ``addcmul_``'s rate; one random number per weight per step (soft S&P's fresh draw, uniform; UPGD's and S&P's
noise, Gaussian) at the generator's rate. ``--memory`` also runs Slowly-Changing Regression
for 10% and for 100% of a run in child processes and compares their peak RSS (target: within
5%).

    python scripts/bench_supervised.py --methods [--cases pm100 pm2000 scr] [--memory] [--device cuda]
    python scripts/bench_supervised.py --methods --specs upgd adam+trac   # a few rows, beside bp
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ppo_cbp.benchmarks import permuted_mnist, scr
from ppo_cbp.benchmarks.autograd_learner import make_learner, uses_fused_trainer
from ppo_cbp.benchmarks.common import MethodConfig, resolve_method
from ppo_cbp.benchmarks.continual_imagenet import imagenet_convnet
from ppo_cbp.benchmarks.conv_learner import stack_networks
from ppo_cbp.errors import UsageError
from ppo_cbp.init import init_layer_
from ppo_cbp.nets.resnet import ResNet18
from ppo_cbp.nets.stacked_mlp import StackedMLP, StackedTrainer
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.kron import Kron


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


# ---- every method -------------------------------------------------------------------------

METHOD_CASES = {
    # network, seeds, loss, the benchmark's method defaults, target share of bp's steps/s
    "pm100": ([784, 100, 100, 100, 10], 3, "cross_entropy", permuted_mnist.DEFAULTS, 0.5),
    "pm2000": ([784, 2000, 2000, 2000, 10], 1, "cross_entropy", permuted_mnist.DEFAULTS, 0.5),
    "scr": ([20, 5, 1], 3, "squared_error", scr.DEFAULTS, 0.25),
}
COMBINATIONS = ("adam+adam_reset", "adam+trac", "cbp+l2_init+layer_norm", "adam+redo+adam_reset")
"""Beyond each method alone: the methods that need another, and the README's combinations."""


def method_specs(defaults: dict) -> list[str]:
    return [m for m in defaults if m != "adam_reset"] + list(COMBINATIONS)


SETTLED = ", settled"
"""The label's suffix of Kron's second row: its steps once the schedule is at its floor."""


def method_rows(specs: list[str]) -> list[tuple[str, str]]:
    """``(label, spec)`` of each row: Kron twice, with a preconditioner update at every step
    (its first 500 steps) and once its schedule has settled at an update every 34th step (from
    about step 4,000 on: nearly all of a run)."""
    return [
        (label, spec)
        for spec in specs
        for label in ([spec, spec + SETTLED] if "kron" in spec.split("+") else [spec])
    ]


def method_step(sizes, seeds, loss, spec, defaults, device, settled=False):
    """run(steps) -> seconds of ``spec``'s learner (the one ``scripts/supervised.py`` builds);
    Kron's schedule held at an update every step, or (``settled``) at its floor."""
    method = resolve_method(MethodConfig(method=spec), defaults)
    with contextlib.redirect_stdout(io.StringIO()):  # the autograd learner's note
        learner = make_learner(
            sizes, list(range(seeds)), method, loss=loss, device=device, dtype=torch.float32
        )
    if "injection" in spec.split("+"):  # its step from the first task boundary on
        learner.task_boundary()
    if isinstance(learner.opt, Kron):
        if settled:
            learner.opt.prob_step = 10**6
        else:
            learner.opt.param_groups[0]["flat_start"] = math.inf
    g = torch.Generator(device=device).manual_seed(0)
    n = 64
    x = torch.rand(n, seeds, 1, sizes[0] + 1, generator=g, device=device)
    x[..., -1] = 1.0
    if loss == "cross_entropy":
        y = torch.randint(0, sizes[-1], (n, seeds, 1), generator=g, device=device)
    else:
        y = torch.randn(n, seeds, 1, sizes[-1], generator=g, device=device)
    out = torch.empty(seeds, 1, sizes[-1], device=device)

    def run(steps: int) -> float:
        sync(device)
        t = time.perf_counter()
        for i in range(steps):
            learner.step(x[i % n], y[i % n], out)
        sync(device)
        return time.perf_counter() - t

    return run, uses_fused_trainer(method)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_rates(sizes, seeds, device, rounds: int) -> dict[str, float]:
    """``torch.bmm``'s multiply-adds per second on the widest hidden layer's Parseval product
    and the generator's uniform and Gaussian numbers per second (one seed's weights at a
    time, as the methods draw them)."""
    out, fan_in = max(zip(sizes[1:-1], sizes[:-2]))
    w = torch.randn(seeds, out, fan_in, device=device)
    gram = torch.empty(seeds, out, out, device=device)
    count = sum(a * b for a, b in zip(sizes, sizes[1:]))
    buf = torch.empty(count, device=device)
    other = torch.rand(count, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def rate(work: float, fn: Callable[[], object], reps: int) -> float:
        fn()
        best = []
        for _ in range(rounds):
            sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(device)
            best.append(reps * work / (time.perf_counter() - t))
        return statistics.median(best)

    reps = max(1, int(2e8 / (seeds * out * out * fan_in)))
    return {
        "bmm_macs_per_s": rate(
            seeds * out * out * fan_in, lambda: torch.bmm(w, w.transpose(1, 2), out=gram), reps
        ),
        "uniform_per_s": rate(count, lambda: buf.uniform_(generator=g), max(1, int(2e7 / count))),
        "normal_per_s": rate(count, lambda: buf.normal_(generator=g), max(1, int(2e7 / count))),
        "addcmul_per_s": rate(
            count, lambda: buf.addcmul_(other, other, value=0.5), max(1, int(2e7 / count))
        ),
    }


def extra_seconds(
    spec: str, sizes, seeds, rates: dict[str, float], settled: bool = False
) -> tuple[float, str]:
    """Seconds per step of the arithmetic that ``spec``'s definition adds to the step, at the
    measured rates, and what it is (Kron's preconditioner updated at every step, or at every
    34th when ``settled``)."""
    weights = sum(a * b for a, b in zip(sizes, sizes[1:]))
    params = weights + sum(sizes[1:])
    names = set(spec.split("+"))
    total, what = 0.0, []
    if "parseval" in names:
        macs = sum(2 * o * o * i for i, o in zip(sizes[:-2], sizes[1:-1]))
        total += seeds * macs / rates["bmm_macs_per_s"]
        what.append(f"{seeds * macs / 1e6:.1f}M multiply-adds")
    if "soft_snp" in names:
        total += seeds * weights / rates["uniform_per_s"]
        what.append(f"{seeds * weights / 1e3:.0f}k uniform draws")
    if "kron" in names:  # kron_torch's products, as it computes them, for each weight's two
        # triangular factors (below 8,192 wide: our sizes; the biases' diagonal ones are
        # elementwise): Q^T Q applied on both sides, 2 (o^2 i + o i^2), at every step; at an
        # update (every step for the first 500) A = Q_0 G Q_1^T (o^2 i + o i^2), two triangular
        # solves (half that), four Gram products (twice that) and triu(T1) Q (o^3 + i^3)
        sides = sum(o * o * i + o * i * i for o, i in zip(sizes[1:], sizes[:-1]))
        cubes = sum(o**3 + i**3 for o, i in zip(sizes[1:], sizes[:-1]))
        macs = 2 * sides + (3.5 * sides + cubes) / (34 if settled else 1)
        total += seeds * macs / rates["bmm_macs_per_s"]
        what.append(f"{seeds * macs / 1e6:.1f}M multiply-adds (preconditioner and its update)")
    if "adam" in names:  # its two moments: three elementwise passes over the parameters
        total += 3 * seeds * params / rates["addcmul_per_s"]
        what.append("3 elementwise passes (moments)")
    if names & {"crelu", "dff"}:  # two features per unit: each consumer's fan-in doubled
        extra = sum(o * i for i, o in zip(sizes[1:-1], sizes[2:]))
        macs = 3 * extra  # the added weights' forward, backward and update
        total += seeds * macs / rates["bmm_macs_per_s"]
        what.append(f"{seeds * macs / 1e6:.1f}M multiply-adds (doubled fan-in)")
    if "injection" in names:  # measured after one injection: theta and theta'_0 are frozen
        head = list(zip(sizes[-3:-1], sizes[-2:]))  # (in, out) of the two head layers
        macs = 2 * sum(o * (i + 1) for i, o in head)  # their forward
        if len(sizes) > 3:  # and phi's gradient through them (none when phi is the input)
            macs += 2 * sum(o * i for i, o in head)
        total += seeds * macs / rates["bmm_macs_per_s"]
        what.append(f"{seeds * macs / 1e3:.0f}k multiply-adds (2 frozen heads)")
    if "trac" in names:  # <theta - theta_ref, g> and theta_ref + (Delta + u) * scale
        total += 2 * seeds * params / rates["addcmul_per_s"]
        what.append("2 elementwise passes (inner product, rescaling)")
    for name in ("upgd", "snp"):
        if name in names:
            total += seeds * params / rates["normal_per_s"]
            what.append(f"{seeds * params / 1e3:.0f}k Gaussian draws")
    return total, ", ".join(what)


_PEAK = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("VmHWM", next(x.split()[1] for x in open("/proc/self/status") if x.startswith("VmHWM")))
"""
"""Runs a script, then prints its process's peak resident memory (kB)."""


def peak_rss_mib(argv: list[str]) -> float:
    """Peak resident memory of ``python argv...`` in MiB: the child's own ``VmHWM`` (the
    kernel's ``ru_maxrss`` would also count the parent's memory it was forked with)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, *argv], capture_output=True, text=True, check=True
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024  # kB


def memory_checks(examples: int) -> list[dict]:
    """Peak RSS of SCR runs stopped at 10% and run to 100% of ``examples``, per method."""
    rows = []
    for spec in ("bp", "cbp", "adam+adam_reset", "upgd", "nap", "injection"):
        peaks = []
        for n in (examples // 10, examples):
            with tempfile.TemporaryDirectory() as out:
                argv = ["scripts/supervised.py", "slowly-changing-regression"]
                argv += ["--method", spec, "--examples", str(n), "--bin-size", str(examples // 100)]
                argv += ["--seeds", "0", "1", "2", "--out", out, "--device", "cpu", "--no-progress"]
                peaks.append(peak_rss_mib(argv))
        growth = peaks[1] / peaks[0] - 1
        rows.append(
            dict(
                method=spec,
                examples=examples,
                rss_10_mib=peaks[0],
                rss_100_mib=peaks[1],
                growth=growth,
                ok=abs(growth) <= 0.05,
            )
        )
        print(
            f"memory {spec:<22} {peaks[0]:8.1f} MiB at 10%  {peaks[1]:8.1f} MiB at 100%  {growth:+.1%}",
            flush=True,
        )
    return rows


def methods_main(args) -> None:
    device = torch.device(args.device)
    report: dict = {
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "cases": {},
    }
    for case in args.cases:
        sizes, seeds, loss, defaults, target = METHOD_CASES[case]
        specs = method_specs(defaults)
        if args.specs:
            specs = ["bp", *(s for s in args.specs if s != "bp")]
        rates = reference_rates(sizes, seeds, device, args.rounds)
        rows_of = method_rows(specs)
        runs = {}
        for label, spec in rows_of:
            settled = label.endswith(SETTLED)
            run, fused = method_step(sizes, seeds, loss, spec, defaults, device, settled)
            run(2)
            per_step = run(3) / 3
            steps = max(3, int(args.seconds / per_step))
            runs[label] = (run, steps, fused)
        times: dict[str, list[float]] = {label: [] for label, _ in rows_of}
        for _ in range(args.rounds):
            for label, (run, steps, _) in runs.items():
                times[label].append(run(steps) / steps)
        t = {spec: statistics.median(v) for spec, v in times.items()}
        base = t["bp"]
        rows = []
        print(
            f"\n{case}: {'-'.join(map(str, sizes))}, {seeds} seed(s), {device}; target >= {target:.0%} of bp"
        )
        print(
            f"{'method':<24} {'learner':<8} {'us/step':>9} {'steps/s':>9} {'overhead us':>11} {'/ bp':>6} {'extra us':>9} {'/ (bp+extra)':>12}  ok"
        )
        for spec, method in rows_of:
            extra, what = extra_seconds(method, sizes, seeds, rates, spec.endswith(SETTLED))
            share = base / t[spec]
            with_extra = (base + extra) / t[spec]
            ok = share >= target or (extra > 0 and with_extra >= target)
            row = dict(
                method=spec,
                learner="fused" if runs[spec][2] else "autograd",
                us_per_step=t[spec] * 1e6,
                steps_per_s=1 / t[spec],
                overhead_us=(t[spec] - base) * 1e6,
                share_of_bp=share,
                extra_us=extra * 1e6,
                extra=what,
                share_of_bp_plus_extra=with_extra if extra > 0 else None,
                target=target,
                ok=ok,
                rounds_us=[x * 1e6 for x in times[spec]],
            )
            rows.append(row)
            print(
                f"{spec:<24} {row['learner']:<8} {row['us_per_step']:>9.0f} {row['steps_per_s']:>9.0f}"
                f" {row['overhead_us']:>11.0f} {share:>6.2f} {extra * 1e6:>9.0f}"
                f" {'' if extra == 0 else f'{with_extra:.2f}':>12}  {'yes' if ok else 'NO'}",
                flush=True,
            )
        report["cases"][case] = dict(sizes=sizes, seeds=seeds, rates=rates, rows=rows)
    if args.memory:
        report["memory"] = memory_checks(args.memory_examples)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0, help="target time per measurement")
    parser.add_argument("--out", default="docs/bench_supervised.json")
    parser.add_argument("--no-conv", action="store_true", help="skip the conv networks")
    parser.add_argument("--only-conv", action="store_true", help="only the conv networks")
    parser.add_argument("--methods", action="store_true", help="every method against bp")
    parser.add_argument("--cases", nargs="+", default=list(METHOD_CASES), choices=METHOD_CASES)
    parser.add_argument(
        "--specs",
        nargs="+",
        metavar="METHOD",
        help="with --methods: only these methods or combinations (bp is always measured)",
    )
    parser.add_argument("--device", default="cpu", help="with --methods: cpu or cuda")
    parser.add_argument("--memory", action="store_true", help="with --methods: peak RSS check")
    parser.add_argument("--memory-examples", type=int, default=300_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.specs and not args.methods:
        parser.error("--specs needs --methods")
    for case in args.cases if args.specs else ():
        for spec in args.specs:
            try:
                resolve_method(MethodConfig(method=spec), METHOD_CASES[case][3])
            except UsageError as e:
                sys.exit(f"error: {case}: {e}")
    if args.methods:
        if args.out == "docs/bench_supervised.json":
            args.out = "docs/bench_methods.json"
        methods_main(args)
        return
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
