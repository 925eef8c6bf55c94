"""Cost of one continual-backprop step relative to one training step.

For each network, times (a) forward + backward + optimizer step on a minibatch and (b) the
same followed by ``ContinualBackprop.step()``, interleaved in one run so that both see the same
machine state. Prints a table and writes JSON.

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
from ppo_cbp.plasticity.cbp import ContinualBackprop

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
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "meta": meta, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
