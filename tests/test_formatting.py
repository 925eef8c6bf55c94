"""Numbers in the closing summaries and sweep tables: counts with thousands separators,
measured values to four significant digits (standard errors to two), durations."""

import math

import pytest

from ppo_cbp.formatting import count, duration, measured
from ppo_cbp.sweep import format_table


@pytest.mark.parametrize(
    "n, text",
    [(0, "0"), (7, "7"), (1024, "1,024"), (100_000_000, "100,000,000"), (1234.6, "1,235")],
)
def test_counts_have_thousands_separators(n, text):
    assert count(n) == text


@pytest.mark.parametrize(
    "value, digits, text",
    [
        (0.0, 4, "0"),
        (0.912345, 4, "0.9123"),
        (-12.3456, 4, "-12.35"),
        (999.94, 4, "999.9"),
        (3456.78, 4, "3,457"),
        (-123456.7, 4, "-123,457"),
        (1.23456e-5, 4, "1.235e-05"),
        (0.000123456, 4, "0.0001235"),
        (0.0123456, 2, "0.012"),
        (12.3456, 2, "12"),
        (math.nan, 4, "-"),
        (math.inf, 4, "inf"),
    ],
)
def test_measured_values_have_fixed_significant_digits(value, digits, text):
    assert measured(value, digits) == text


@pytest.mark.parametrize(
    "seconds, text", [(4.25, "4.2s"), (59.94, "59.9s"), (187.4, "3m07s"), (18129, "5h02m09s")]
)
def test_durations(seconds, text):
    assert duration(seconds) == text


def test_sweep_table_cells():
    rows = [
        {"lr": "0.01", "n": 30, "final_return": 3456.78, "loss": 0.0123456},
        {"lr": "0.1", "n": 1200, "final_return": -12.3456, "loss": math.nan},
    ]
    lines = format_table(rows, ["lr", "n", "final_return", "loss"]).splitlines()
    assert [line.split() for line in lines] == [
        ["lr", "n", "final_return", "loss"],
        ["----", "-----", "------------", "-------"],
        ["0.01", "30", "3,457", "0.01235"],
        ["0.1", "1,200", "-12.35", "-"],
    ]


def test_supervised_closing_summary_numbers(tmp_path):
    from ppo_cbp.benchmarks.common import closing_summary

    summary = {
        "benchmark": "permuted_mnist",
        "method": "cbp",
        "tasks_completed": 1200,
        "tasks": 5000,
        "metric": "accuracy",
        "seconds_this_call": 187.4,
        "examples_per_second_all_seeds": 24691.2,
        "examples_per_second_per_seed": 12345.6,
        "final_over_seeds": {"accuracy": {"mean": 0.9034565, "standard_error": 0.0088885}},
        "seeds": {
            "0": {"last": {"accuracy": 0.912345}, "units_replaced": 12345},
            "1": {"last": {"accuracy": 0.894568}, "units_replaced": 987},
        },
    }
    lines = closing_summary(summary, tmp_path).splitlines()
    assert lines[:4] == [
        "permuted_mnist cbp: 1,200/5,000 tasks, 3m07s in this call, 12,346 examples/s per seed "
        "(2 seed(s))",
        "final accuracy: seed 0 0.9123, seed 1 0.8946",
        "final accuracy, mean over 2 seed(s): 0.9035 +- 0.0089 (standard error over seeds)",
        "units replaced: 13,332 (seed 0 12,345, seed 1 987)",
    ]
