"""scripts/bench_gpu.py at tiny sizes: the JSON it writes and the op-count ratios in it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_writes_counts_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "op_counts", "throughput", "core"}
    assert data["meta"]["tiny"] is True
    counts = data["op_counts"]
    assert [r["network"].split(",")[0] for r in counts] == [
        "convnet", "resnet18", "MLP 27-256-256-8 (PPO)", "MLP 784-2000x3-10", "MLP 784-2000x3-10",
    ]  # fmt: skip
    for r in counts:
        # ratios come from the reported counts, not from timings
        assert r["cbp_over_train"] == r["cbp_ops"] / r["train_ops"]
        assert r["cbp_over_train_top"] == r["cbp_ops_top"] / r["train_ops_top"]
        assert 0 < r["cbp_ops_top"] <= r["cbp_ops"] and 0 < r["train_ops_top"] <= r["train_ops"]
    rates = {r["case"]: r for r in data["throughput"]}
    assert rates["convnet, 1 seed + CBP"]["rate"] > 0
    assert rates["stacked MLP width 32, 2 seeds + CBP"]["rate"] > 0
    assert sorted(rates) == sorted(
        [
            f"{k}, {s}{c}"
            for k in ("convnet", "resnet18")
            for s in ("1 seed", "8 seeds")
            for c in ("", " + CBP")
        ]
        + ["stacked MLP width 32, 2 seeds", "stacked MLP width 32, 2 seeds + CBP"]
    )
    assert all(r["rate"] > 0 for r in rates.values())
    assert len(data["core"]) == 3 and all(r["cbp_step_ms"] > 0 for r in data["core"])
    assert "aten ops per step" in result.stdout
