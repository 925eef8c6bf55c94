"""Throughput of the PPO trainer against the environment's own step rate.

Usage::

    python scripts/bench_ppo.py                       # Hopper-v4 and Ant-v4, ~3 minutes
    python scripts/bench_ppo.py --updates 5 --json bench_ppo.json

For each env, in one process run:

* the **raw env step rate**: ``gym.make(env)`` stepped with uniform random actions from the
  action space (resets included, no wrappers of ours), ``--raw-steps`` steps, measured before,
  between and after the trainer runs; ratios use the fastest measurement;
* plain PPO, PPO+CBP and PPO+ReDo at the trainer's **default settings** (one env, one torch
  thread, rollouts of 2048 steps, 10 epochs x 16 minibatches, friction wrapper on, plasticity
  metrics every 10 updates), ``--updates`` updates each: steps/s (total steps / wall time of the
  training loop) and its ratio to the raw rate, and the share of wall time spent in the env
  (``env.step`` of our env stack), acting (the rest of the rollout loop: policy forward,
  sampling, buffers), the update excluding CBP/ReDo (targets, GAE, minibatch steps), CBP/ReDo
  (their ``step`` after each minibatch) and the plasticity metrics;
* PPO+CBP with ``--num-envs 2`` (env 0 in the trainer's process, env 1 in a worker) and its
  speedup over one env.

Before the timed runs, two untimed one-update runs (CBP and ReDo, 256 steps) pay the costs
that come once per process: loading the numba kernels of CBP's utility update (~0.3 s, which
would otherwise count as CBP time in the first timed configuration) and first calls of MKL and
numpy. Per-step costs in microseconds (``us_per_step``) are recorded next to the shares.

It prints a table and the issue's targets (PPO+CBP >= 50% of the raw rate on Ant-v4, >= 33% on
Hopper-v4; CBP <= 5% of wall time; 2 envs >= 1.4x one env), and writes everything to JSON
together with the machine's load average (other processes on the machine slow every number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppo_cbp.train import Args, main

METHODS = {"ppo": {}, "ppo+cbp": {"cbp": True}, "ppo+redo": {"redo": True}}


def raw_env_rate(env_id: str, steps: int, seed: int = 0) -> float:
    """Steps per second of ``gym.make(env_id)`` with uniform random actions, resets included."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(env_id)
    env.reset(seed=seed)
    space = env.action_space
    actions = np.random.default_rng(seed).uniform(space.low, space.high, (steps, *space.shape))
    actions = actions.astype(space.dtype)
    for a in actions[:200]:  # warm-up
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def warm_up(env_id: str, runs_dir: str) -> None:
    """Untimed one-update runs with CBP and with ReDo: once-per-process costs (numba kernels)."""
    for kw in ({"cbp": True}, {"redo": True}):
        main(
            Args(
                env=env_id,
                steps=256,
                num_steps=256,
                num_minibatches=2,
                update_epochs=1,
                metrics_every=1,
                runs_dir=runs_dir,
                run_name=f"warmup_{env_id}_{'_'.join(kw)}",
                progress=False,
                device="cpu",
                **kw,
            )
        )


def run_trainer(env_id: str, updates: int, runs_dir: str, num_envs: int = 1, **kw) -> dict:
    steps = updates * 2048 * num_envs
    name = f"bench_{env_id}_{'_'.join(kw) or 'ppo'}_{num_envs}"
    result = main(
        Args(
            env=env_id,
            steps=steps,
            num_envs=num_envs,
            runs_dir=runs_dir,
            run_name=name,
            progress=False,
            device="cpu",
            **kw,
        )
    )
    t = result.timings
    total = t["total"]
    n = result.global_step
    return {
        "steps": n,
        "seconds": total,
        "sps": n / total,
        "us_per_step": {
            "total": 1e6 * total / n,
            "env": 1e6 * t["env"] / n,
            "acting": 1e6 * t["acting"] / n,
            "update_excl_cbp": 1e6 * (t["update"] - t["cbp"]) / n,
            "cbp": 1e6 * t["cbp"] / n,
            "metrics": 1e6 * t["metrics"] / n,
        },
        "share": {
            "env": t["env"] / total,
            "acting": t["acting"] / total,
            "update_excl_cbp": (t["update"] - t["cbp"]) / total,
            "cbp": t["cbp"] / total,
            "metrics": t["metrics"] / total,
            "other": max(0.0, 1.0 - (t["env"] + t["acting"] + t["update"] + t["metrics"]) / total),
        },
    }


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["Hopper-v4", "Ant-v4"])
    parser.add_argument(
        "--updates", type=int, default=10, help="updates per configuration (x 2048 steps)"
    )
    parser.add_argument("--raw-steps", type=int, default=10_000)
    parser.add_argument("--json", default="bench_ppo.json", help="output file")
    parser.add_argument("--no-two-envs", action="store_true", help="skip the --num-envs 2 run")
    opts = parser.parse_args()
    if opts.updates < 1 or opts.raw_steps < 1:
        parser.error("--updates and --raw-steps must be positive")

    torch.set_num_threads(1)
    report: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gymnasium": gym.__version__,
            "load_average_start": os.getloadavg(),
        },
        "updates_per_config": opts.updates,
        "envs": {},
    }
    with tempfile.TemporaryDirectory() as runs_dir:
        for env_id in opts.envs:
            # The raw rate is measured before, between and after the trainer runs; the ratios use
            # the fastest of them (other processes on a shared machine only slow things down).
            warm_up(env_id, runs_dir)
            raw = [raw_env_rate(env_id, opts.raw_steps)]
            entry: dict = {}
            for method, kw in METHODS.items():
                entry[method] = run_trainer(env_id, opts.updates, runs_dir, **kw)
                raw.append(raw_env_rate(env_id, opts.raw_steps))
                print(
                    f"{env_id:10s} {method:9s} {entry[method]['sps']:7.0f} steps/s", file=sys.stderr
                )
            if not opts.no_two_envs:
                r = run_trainer(env_id, opts.updates, runs_dir, num_envs=2, cbp=True)
                r["speedup_over_one_env"] = r["sps"] / entry["ppo+cbp"]["sps"]
                entry["ppo+cbp,2envs"] = r
            entry["raw_sps"] = max(raw)
            entry["raw_sps_measurements"] = raw
            for config in entry.values():
                if isinstance(config, dict):
                    config["fraction_of_raw"] = config["sps"] / entry["raw_sps"]
            report["envs"][env_id] = entry
    report["machine"]["load_average_end"] = os.getloadavg()

    header = f"{'env':10s} {'config':15s} {'steps/s':>8s} {'% raw':>6s} {'env':>6s} {'acting':>6s} {'update':>6s} {'cbp':>6s} {'metrics':>7s}"
    print(header)
    print("-" * len(header))
    for env_id, entry in report["envs"].items():
        print(
            f"{env_id:10s} {'raw env':15s} {entry['raw_sps']:8.0f} "
            f"(max of {', '.join(f'{x:.0f}' for x in entry['raw_sps_measurements'])})"
        )
        for config, r in entry.items():
            if not isinstance(r, dict):
                continue
            s = r["share"]
            print(
                f"{env_id:10s} {config:15s} {r['sps']:8.0f} {100 * r['sps'] / entry['raw_sps']:5.1f}% "
                f"{100 * s['env']:5.1f}% {100 * s['acting']:5.1f}% {100 * s['update_excl_cbp']:5.1f}% "
                f"{100 * s['cbp']:5.1f}% {100 * s['metrics']:6.2f}%"
            )
    print("\nshares are of the training loop's wall time; % raw = steps/s / raw env steps/s")

    targets = []
    for env_id, need in (("Ant-v4", 0.50), ("Hopper-v4", 0.33)):
        if env_id in report["envs"]:
            got = report["envs"][env_id]["ppo+cbp"]["fraction_of_raw"]
            targets.append(
                (f"PPO+CBP on {env_id} >= {need:.0%} of raw env rate", got >= need, f"{got:.1%}")
            )
    for env_id, entry in report["envs"].items():
        got = entry["ppo+cbp"]["share"]["cbp"]
        targets.append((f"CBP <= 5% of wall time on {env_id}", got <= 0.05, f"{got:.1%}"))
        got = entry["ppo+cbp"]["share"]["metrics"]
        targets.append(
            (f"plasticity metrics <= 3% of wall time on {env_id}", got <= 0.03, f"{got:.2%}")
        )
        if "ppo+cbp,2envs" in entry:
            got = entry["ppo+cbp,2envs"]["speedup_over_one_env"]
            targets.append((f"--num-envs 2 >= 1.4x one env on {env_id}", got >= 1.4, f"{got:.2f}x"))
    print()
    for name, ok, got in targets:
        print(f"[{'met' if ok else 'MISSED'}] {name}: {got}")
    report["targets"] = [{"target": n, "met": ok, "measured": g} for n, ok, g in targets]
    Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nwritten to {opts.json}; load average {report['machine']['load_average_start']} -> {report['machine']['load_average_end']}"
    )


if __name__ == "__main__":
    main_bench()
