"""What the run-level tests of the supervised benchmarks share: a seed's CSV rows, a run's
checkpoint, and the check that seeds trained as one stacked network end as their runs alone."""

import csv

import pytest
import torch

TOL = dict(rtol=1e-10, atol=1e-10)


def read_rows(out, seed):
    """Seed ``seed``'s ``metrics.csv`` rows of the run in ``out``, every value a float."""
    with open(out / f"seed_{seed}" / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def checkpoint(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def assert_stacked_run_equals_runs_alone(run, config, seeds, rows_per_seed):
    """Runs ``run(config(name, seeds))`` once with all ``seeds`` stacked and once per seed alone
    (``config`` names the run folder ``name``), and checks that each seed writes the same
    ``rows_per_seed`` CSV rows (to 1e-10, float64 runs) and ends with the same weights and SGD
    momentum as alone, and that the seeds differ. Returns the stacked run's rows per seed."""
    stacked = config("stacked", seeds)
    run(stacked)
    stacked_rows = {s: read_rows(stacked.out, s) for s in seeds}
    stacked_state = checkpoint(stacked.out)["learner"]
    for i, s in enumerate(seeds):
        alone = config(f"alone{s}", [s])
        run(alone)
        rows = read_rows(alone.out, s)
        assert len(rows) == len(stacked_rows[s]) == rows_per_seed
        for got, want in zip(stacked_rows[s], rows):
            assert list(got) == list(want)
            assert got == pytest.approx(want, rel=1e-10, abs=1e-10)
        state = checkpoint(alone.out)["learner"]
        for name, p in state["net"].items():
            torch.testing.assert_close(stacked_state["net"][name][i], p[0], **TOL)
        for k, buf in state["opt"]["state"].items():
            torch.testing.assert_close(
                stacked_state["opt"]["state"][k]["momentum_buffer"][i],
                buf["momentum_buffer"][0],
                **TOL,
            )
    # the seeds differ (their own class orders, data orders and initial weights)
    assert stacked_rows[seeds[0]] != stacked_rows[seeds[1]]
    return stacked_rows
