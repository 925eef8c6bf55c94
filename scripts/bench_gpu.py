"""GPU throughput of the supervised networks with and without CBP, and CBP's op count.

On a CUDA device (timed with CUDA events around the timed loops only, after untimed warm-up
steps):

* images/s of one training step (forward, cross-entropy, backward, SGD with momentum) of the
  Continual ImageNet ConvNet (batch 100) and the CIFAR ResNet-18 (batch 90), with and without
  CBP at the paper's settings, for 1 seed and for 8 stacked seeds (the stacked networks that
  ``continual-imagenet`` and ``incremental-cifar`` train);
* examples/s of the stacked MLP trainer (``ppo_cbp.nets.stacked_mlp``) at Permuted MNIST's width 2000
  with 16 seeds, batch 1, with and without CBP, after start-up;
* the MLP cases of ``scripts/bench_core.py`` (train step and CBP step in ms).

Always (on the CPU, deterministic): the op-count table. For each network, the aten ops that one
training step dispatches (forward, loss, backward, optimizer step) and the aten ops that one
``ContinualBackprop.step()`` dispatches on a step that replaces nothing, counted with
``torch.profiler``. Definition: every ``aten::`` op the dispatcher records, nested ones
included (``all``; the count behind "about 300 ops a step"); the ops called from Python alone
(``top``) are reported beside it. CBP is counted on its tensor-op path, the one GPUs take: its
numba kernels (``ppo_cbp.nets.kernels``, used for Linear layers on the CPU) are disabled for the
count. Ratios are computed from the counts.

On a CPU the throughput cases run at tiny sizes (the op counts at full size); with ``--tiny``
everything does, so that the script checks itself in seconds (op counts barely depend on the
minibatch size).

    python scripts/bench_gpu.py [--json docs/bench_gpu.json] [--tiny] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core
from bench_supervised import CONV, conv_step, fused_step

from ppo_cbp.plasticity.cbp import ContinualBackprop

TINY_SIDE = {"convnet": 32, "resnet18": 16}
"""Image side at tiny sizes (the ConvNet's Linear layer needs 32x32 inputs)."""

# ---------------------------------------------------------------------------------------------
# op counts


def count_ops(fn: Callable[[], object]) -> dict[str, int]:
    """aten ops that ``fn()`` dispatches: all of them, and those not nested in another."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total = top = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        total += 1
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        top += parent is None
    return {"all": total, "top": top}


def op_count_row(name: str, net, batch: int, inputs, target, loss_fn, opt, cbp_kwargs) -> dict:
    x = torch.randn(batch, *inputs)
    y = target(batch)
    # maturity threshold as set: no unit is mature within the few steps below, so the counted
    # CBP step replaces nothing (the steps this count is about)
    cbp = ContinualBackprop(net, opt, **cbp_kwargs)
    cbp._kernel_state = None  # the tensor-op path that GPUs take

    def train():
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        train()
        cbp.step()
    train_ops = count_ops(train)
    before = cbp.num_replaced
    cbp_ops = count_ops(cbp.step)
    assert cbp.num_replaced == before, "the counted CBP step must replace nothing"
    return {
        "network": name,
        "utility": cbp_kwargs["utility"],
        "train_ops": train_ops["all"],
        "cbp_ops": cbp_ops["all"],
        "cbp_over_train": cbp_ops["all"] / train_ops["all"],
        "train_ops_top": train_ops["top"],
        "cbp_ops_top": cbp_ops["top"],
        "cbp_over_train_top": cbp_ops["top"] / train_ops["top"],
    }


def op_counts(tiny: bool) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for kind, (build, batch, classes, lr, wd, settings) in CONV.items():
        net = build()
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        rows.append(
            op_count_row(
                f"{kind}, batch {2 if tiny else batch}",
                net,
                2 if tiny else batch,
                (3, TINY_SIDE[kind] if tiny else 32, TINY_SIDE[kind] if tiny else 32),
                lambda b, c=classes: torch.randint(0, c, (b,)),
                F.cross_entropy,
                opt,
                dict(decay_rate=0.99, **settings),
            )
        )
    for name, sizes, optimizer, init, kwargs in bench_core.CASES:
        net = bench_core.build(sizes, init)
        opt = (
            torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.99, 0.99))
            if optimizer == "adam"
            else torch.optim.SGD(net.parameters(), lr=3e-3)
        )
        batch = 64 if optimizer == "adam" else 128
        batch = 2 if tiny else batch
        rows.append(
            op_count_row(
                f"{name}, batch {batch}",
                net,
                batch,
                (sizes[0],),
                lambda b, n=sizes[-1]: torch.randn(b, n),
                lambda out, y: (out - y).pow(2).mean(),
                opt,
                dict(maturity_threshold=100, init=init, **kwargs),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# throughput


class Timer:
    """Seconds of ``steps`` calls: CUDA events on a GPU (no sync inside), else the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step: Callable[[], object], steps: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - t


def rate(step: Callable[[], object], per_step: int, timer: Timer, seconds: float, tiny: bool):
    """Items per second of ``step`` (``per_step`` items each), after warm-up steps."""
    for _ in range(2 if tiny else 20):
        step()
    if tiny:
        return per_step * 2 / timer(step, 2)
    probe = timer(step, 10) / 10
    steps = max(10, int(seconds / max(probe, 1e-6)))
    return per_step * steps / timer(step, steps)


def throughput(device: torch.device, tiny: bool, seconds: float) -> list[dict]:
    timer, rows = Timer(device), []
    for kind in CONV:
        for seeds in (1, 8):
            for cbp in (False, True):
                name = f"{kind}, {seeds} seed{'s' if seeds > 1 else ''}{' + CBP' if cbp else ''}"
                size = dict(batch=2, side=TINY_SIDE[kind]) if tiny else {}
                case = conv_step(kind, cbp, seeds, device, **size)
                rows.append({"case": name, "unit": "images/s", "rate": rate(*case, timer, seconds, tiny)})  # fmt: skip
    width, seeds = (32, 2) if tiny else (2000, 16)
    for cbp in (False, True):
        sizes = [784, width, width, width, 10]
        case = fused_step(sizes, seeds, cbp, "cross_entropy", 0.003, device=device), seeds
        name = f"stacked MLP width {width}, {seeds} seeds{' + CBP' if cbp else ''}"
        rows.append({"case": name, "unit": "examples/s", "rate": rate(*case, timer, seconds, tiny)})
    return rows


def core_cases(device: torch.device, tiny: bool) -> list[dict]:
    rows = []
    for name, sizes, optimizer, init, kwargs in bench_core.CASES:
        if tiny:
            sizes = [min(s, 32) for s in sizes]
        r = bench_core.measure(
            sizes, optimizer, init, kwargs, 8 if tiny else 128, 3 if tiny else 200, device.type
        )
        rows.append({"network": name, "sizes": sizes, **r})
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (automatic on a CPU)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per case")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    torch.set_num_threads(1)

    counts = op_counts(args.tiny)  # CPU-countable at full size
    rates = throughput(device, tiny, args.seconds)
    core = core_cases(device, tiny)

    print("aten ops per step (CPU; CBP on its tensor-op path, a step that replaces nothing)")
    print("all: every dispatched aten op, nested included; top-level: those called from Python")
    print(
        f"{'network':48s} {'train':>6s} {'CBP':>5s} {'CBP/train':>9s}   top-level: train CBP ratio"
    )
    for r in counts:
        print(
            f"{r['network']:48s} {r['train_ops']:6d} {r['cbp_ops']:5d} {100 * r['cbp_over_train']:8.1f}%"
            f"   {r['train_ops_top']:5d} {r['cbp_ops_top']:4d} {100 * r['cbp_over_train_top']:5.1f}%"
        )
    print(f"\nthroughput on {device.type}{' (tiny sizes)' if tiny else ''}")
    for r in rates:
        shown = r.get("note") or f"{r['rate']:,.0f} {r['unit']}"
        print(f"{r['case']:48s} {shown}")
    print("\nbench_core MLP cases (ms)")
    for r in core:
        print(
            f"{r['network']:48s} train {r['train_step_ms']:.3f}  CBP {r['cbp_step_ms']:.3f}"
            f"  ({100 * r['cbp_over_train_step']:.1f}%)"
        )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor(),
            "python": platform.python_version(),
            "tiny": tiny,
            "op_count_definition": "all aten ops recorded by torch.profiler on the CPU, nested "
            "included ('all'); ops not nested in another aten op ('top'); CBP kernels disabled",
        }
        with open(args.json, "w") as f:
            json.dump(
                {"meta": meta, "op_counts": counts, "throughput": rates, "core": core}, f, indent=2
            )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
