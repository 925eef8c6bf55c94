"""Every configuration's one label (ppo_cbp.plasticity.suite.Label), as the entry points record
it and the figures, tables, run folders and sweeps use it: every method alone and every README
combination, on PPO and on a supervised benchmark, in one plot, give as many distinct labels,
colours and table rows as configurations."""

import csv
import json

import pytest
from test_plot import ppo_run, supervised_run

from ppo_cbp.benchmarks.common import config_dict, resolve_method, run_label
from ppo_cbp.benchmarks.registry import parse
from ppo_cbp.benchmarks.scr import DEFAULTS as SCR_DEFAULTS
from ppo_cbp.plasticity import suite
from ppo_cbp.ppo.settings import args_dict, configuration_label, resolve_args, run_slug
from ppo_cbp.reporting.figures import _colour_map, group_runs, load_runs, plot_runs
from ppo_cbp.train import Args

PPO_CONFIGURATIONS = [
    {},
    dict(standard_adam=True),
    dict(cbp=True),
    dict(redo=True),
    dict(l2=True),
    dict(shrink_perturb=True),
    dict(shrink_perturb=True, noise_std=1e-4),  # README
    dict(l2_init=1e-2),
    dict(parseval=1e-3),
    dict(weight_clipping=3.0),
    dict(soft_shrink_perturb=0.999999),
    dict(shrink_perturb_init=0.5),
    dict(head_reset=1),
    dict(adam_reset=True),
    dict(layer_norm=True),
    dict(nap=True),
    dict(crelu=True),
    dict(injection=True),
    dict(upgd=True),
    dict(trac=True),
    dict(c_chain=True),
    dict(cbp=True, paper_exact=True, steps=20_000_000),  # README
    dict(cbp=True, layer_norm=True),
    dict(l2_init=1e-2, crelu=True),
    dict(dff=True),
    dict(cbp=True, replacement_rate=1e-3),
    dict(dynamics=["friction", "gravity"]),  # README
]
SUPERVISED_METHODS = [*SCR_DEFAULTS, "cbp+l2_init+layer_norm", "adam+redo+adam_reset"]


def _ppo_config(flags: dict) -> dict:
    args = resolve_args(Args(env="Hopper-v4", device="cpu", **flags))
    return dict(args_dict(args), label=configuration_label(args).text)


def _supervised_config(spec: str) -> dict:
    cfg = parse(["slowly-changing-regression", "--method", spec])
    method = resolve_method(cfg.method, SCR_DEFAULTS)
    label = run_label(cfg, method, lambda m: resolve_method(m, SCR_DEFAULTS))
    return dict(config_dict(cfg), resolved_method=config_dict(method), label=label.text)


def test_labels_name_methods_and_the_settings_that_differ():
    assert _ppo_config({})["label"] == "Tuned Adam"
    assert _ppo_config(dict(standard_adam=True))["label"] == "Standard Adam"
    assert _ppo_config(dict(cbp=True))["label"] == "CBP"  # its L2 1e-4 is --cbp's own
    assert _ppo_config(dict(upgd=True))["label"] == "UPGD"  # lr 3e-4 etc. are --upgd's own
    assert _ppo_config(dict(l2_init=1e-3))["label"] == "L2-Init (l2_init=0.001)"
    assert (
        _ppo_config(dict(layer_norm=True, cbp=True, replacement_rate=1e-3))["label"]
        == "CBP + LayerNorm (replacement_rate=0.001)"
    )
    assert _supervised_config("l2_init+cbp")["label"] == "CBP + L2-Init"  # the suite's order
    assert _supervised_config("cbp")["label"] == "CBP"


def test_run_folder_names_come_from_the_label():
    args = resolve_args(Args(env="Hopper-v4", device="cpu", cbp=True, layer_norm=True))
    assert run_slug(configuration_label(args)) == "cbp+layer_norm"
    args = resolve_args(Args(device="cpu", trac=True, learning_rate=3e-4))
    assert run_slug(configuration_label(args)) == "trac__learning_rate=0.0003"
    long = suite.Label(("cbp",), tuple((f"setting_{i}", i) for i in range(30)))
    assert len(run_slug(long)) == 100 and run_slug(long) != run_slug(suite.Label(("cbp",)))


@pytest.mark.slow
def test_every_configuration_one_label_colour_and_row(tmp_path):
    """Every PPO method alone, the README's combinations and a few settings, and every
    supervised method alone and README combination: each configuration one label, one
    colour, one table row; labels that do not depend on the other runs shown."""
    configs = [_ppo_config(f) for f in PPO_CONFIGURATIONS]
    for i, config in enumerate(configs):
        points = [(100 * b, float(i + b)) for b in range(1, 6)]
        settings = {k: v for k, v in config.items() if k != "seed"}
        ppo_run(tmp_path / "ppo" / f"run_{i}", 0, {"charts/episodic_return": points}, **settings)
    sup = [_supervised_config(spec) for spec in SUPERVISED_METHODS]
    for i, config in enumerate(sup):
        rows = [
            {"bin": b, "examples": 1000 * (b + 1), "squared_error": 1.0 / (i + b + 1)}
            for b in range(3)
        ]
        supervised_run(tmp_path / "sup" / f"run_{i}", config["method"]["method"], {0: rows})
        path = tmp_path / "sup" / f"run_{i}" / "config.json"
        path.write_text(json.dumps(config))
    for kind, n in (("ppo", len(configs)), ("sup", len(sup))):
        groups = group_runs(load_runs([tmp_path / kind], ppo_settings=Args))
        assert len(groups) == n
        labels = [g.label for g in groups]
        assert len(set(labels)) == n and not any("[" in label for label in labels)  # no hash
        assert len(set(_colour_map(groups).values())) == n
        # the label does not depend on the other runs: each run alone gets the same one
        for g in groups[:3]:
            (alone,) = group_runs(load_runs([g.runs[0].run_dir], ppo_settings=Args))
            assert alone.label == g.label
        plot_runs([tmp_path / kind], tmp_path / f"fig_{kind}", name="f", ppo_settings=Args)
        rows = list(csv.DictReader(open(tmp_path / f"fig_{kind}" / "f_table.csv")))
        final = [r for r in rows if r["metric"] == "final"]
        assert len(final) == n and {r["group"] for r in final} == set(labels)
