"""The results table: each run's last rows, mean and 95% t interval over seeds."""

import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import method_table  # noqa: E402


def _run(folder: Path, values: dict[int, list[float]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({}))
    for seed, column in values.items():
        (folder / f"seed_{seed}").mkdir()
        with open(folder / f"seed_{seed}" / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["task", "accuracy"])
            w.writeheader()
            for i, v in enumerate(column):
                w.writerow({"task": i, "accuracy": v})
    return folder


def test_mean_and_t_interval_of_the_last_rows(tmp_path, capsys):
    run = _run(tmp_path / "cbp", {0: [0.1, 0.8], 1: [0.2, 0.9], 2: [0.3, 0.7]})
    assert method_table.main([str(run), "--metrics", "accuracy"]) == 0
    out = capsys.readouterr().out
    # last rows 0.8, 0.9, 0.7: mean 0.8, s = 0.1; with 2 degrees of freedom the t quantile
    # has the closed form (2p - 1) / sqrt(2 p (1 - p))
    p = 0.975
    half = (2 * p - 1) / math.sqrt(2 * p * (1 - p)) * 0.1 / math.sqrt(3)
    assert f"| cbp | 3 | 0.8 ± {half:.2g} |" in out
    assert method_table.main([str(run), "--metrics", "accuracy:mean"]) == 0
    # per-seed means over rows 0.45, 0.55, 0.5: mean 0.5, s = 0.05
    assert f"| cbp | 3 | 0.5 ± {half / 2:.2g} |" in capsys.readouterr().out
    mean, h = method_table.mean_interval([0.8, 0.9, 0.7])
    assert math.isclose(mean, 0.8) and math.isclose(h, half, rel_tol=1e-12)
    assert method_table.mean_interval([0.5]) == (0.5, None)


def test_a_folder_that_is_not_a_run_is_one_error(tmp_path, capsys):
    assert method_table.main([str(tmp_path), "--metrics", "accuracy"]) == 2
    assert capsys.readouterr().err.startswith("error: not a run folder")
