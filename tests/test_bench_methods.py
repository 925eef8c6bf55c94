"""``scripts/bench_supervised.py --methods``: which rows it measures and the arithmetic it
credits each method with, by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_supervised as bench  # noqa: E402

from ppo_cbp.benchmarks import permuted_mnist, scr  # noqa: E402
from ppo_cbp.benchmarks.common import METHODS  # noqa: E402

RATES = {"bmm_macs_per_s": 10.0, "uniform_per_s": 4.0, "normal_per_s": 2.0, "addcmul_per_s": 5.0}


@pytest.mark.parametrize("defaults", [permuted_mnist.DEFAULTS, scr.DEFAULTS])
def test_a_row_for_every_method_and_the_readme_combinations(defaults):
    specs = bench.method_specs(defaults)
    alone = {s for s in specs if "+" not in s}
    assert alone == set(defaults) - {"adam_reset"}  # adam_reset needs adam: adam+adam_reset
    assert {m for s in specs for m in s.split("+")} == set(defaults) <= set(METHODS)
    assert {"cbp+l2_init+layer_norm", "adam+redo+adam_reset"} <= set(specs)


def test_extra_arithmetic_by_hand():
    sizes, seeds = [4, 3, 2], 2  # weights 4*3 + 3*2 = 18, parameters 18 + 3 + 2 = 23
    seconds, _ = bench.extra_seconds("parseval", sizes, seeds, RATES)
    assert seconds == pytest.approx(seeds * 2 * 3 * 3 * 4 / 10.0)  # 2 out^2 in, hidden only
    assert bench.extra_seconds("soft_snp", sizes, seeds, RATES)[0] == pytest.approx(2 * 18 / 4)
    assert bench.extra_seconds("upgd", sizes, seeds, RATES)[0] == pytest.approx(2 * 23 / 2)
    assert bench.extra_seconds("snp", sizes, seeds, RATES)[0] == pytest.approx(2 * 23 / 2)
    assert bench.extra_seconds("adam", sizes, seeds, RATES)[0] == pytest.approx(3 * 2 * 23 / 5)
    # weights [3, 4] and [2, 3]: Q^T Q on both sides at every step (2 products per side), at an
    # update A (1 product per side), 2 solves (half), 4 Grams (2 per side) and triu(T1) Q
    sides = (3 * 3 * 4 + 3 * 4 * 4) + (2 * 2 * 3 + 2 * 3 * 3)
    kron = (2 + 1 + 0.5 + 2) * sides + 3**3 + 4**3 + 2**3 + 3**3
    assert bench.extra_seconds("kron", sizes, seeds, RATES)[0] == pytest.approx(2 * kron / 10)
    settled = 2 * sides + ((1 + 0.5 + 2) * sides + 3**3 + 4**3 + 2**3 + 3**3) / 34
    assert bench.extra_seconds("kron", sizes, seeds, RATES, True)[0] == pytest.approx(
        2 * settled / 10
    )
    rows = bench.method_rows(["bp", "kron", "upgd"])
    assert rows == [("bp", "bp"), ("kron", "kron"), ("kron, settled", "kron"), ("upgd", "upgd")]
    # CReLU and DFF: the output layer reads 2 * 3 features: 2 * 3 more weights, 3 passes
    assert bench.extra_seconds("dff", sizes, seeds, RATES)[0] == pytest.approx(2 * 3 * 6 / 10)
    assert bench.extra_seconds("crelu", [5, 4, 3, 2], seeds, RATES)[0] == pytest.approx(
        2 * 3 * (3 * 4 + 2 * 3) / 10
    )
    # after one injection: two frozen copies of the head 4-3-2 (phi is the input: no gradient)
    injection = bench.extra_seconds("injection", sizes, seeds, RATES)[0]
    assert injection == pytest.approx(2 * 2 * (3 * 5 + 2 * 4) / 10)
    deeper = bench.extra_seconds("injection", [5, 4, 3, 2], seeds, RATES)[0]
    assert deeper == pytest.approx(2 * 2 * (3 * 5 + 2 * 4 + 3 * 4 + 2 * 3) / 10)
    assert bench.extra_seconds("trac", sizes, seeds, RATES)[0] == pytest.approx(2 * 2 * 23 / 5)
    adam_trac = bench.extra_seconds("adam+trac", sizes, seeds, RATES)[0]
    assert adam_trac == pytest.approx(5 * 2 * 23 / 5)
    assert bench.extra_seconds("cbp+l2_init", sizes, seeds, RATES) == (0.0, "")
    both = bench.extra_seconds("snp+parseval", sizes, seeds, RATES)[0]
    assert both == pytest.approx(2 * 23 / 2 + 2 * 72 / 10)


def test_unknown_spec_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "bench.json"
    argv = [sys.executable, bench.__file__, "--methods", "--cases", "scr", "--out", str(out)]
    done = subprocess.run([*argv, "--specs", "upgd", "nonsense"], capture_output=True, text=True)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.startswith("error: scr: unknown method 'nonsense'")
    assert done.stderr.count("\n") == 1 and not out.exists()
