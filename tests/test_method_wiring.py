"""How both entry points wire the method suite: C-CHAIN's restart at friction changes, PPO's
UPGD, the settings of unselected methods, the settings' renamed flags, and checkpoints written
before the suite."""

import json

import pytest
import torch
from test_supervised import scr_config
from test_train import load, small

from ppo_cbp.benchmarks import MethodConfig
from ppo_cbp.benchmarks.common import resolve_method
from ppo_cbp.benchmarks.registry import parse
from ppo_cbp.benchmarks.scr import DEFAULTS as SCR_DEFAULTS
from ppo_cbp.benchmarks.scr import run_scr
from ppo_cbp.errors import UsageError
from ppo_cbp.plasticity.upgd import AdaptiveUPGD
from ppo_cbp.ppo import agent as ppo_agent
from ppo_cbp.ppo.agent import make_agent, method_state
from ppo_cbp.ppo.run import seed_everything
from ppo_cbp.ppo.settings import resolve_args
from ppo_cbp.train import Args, main


def test_c_chain_restarts_at_every_friction_change(tmp_path):
    """The authors restart C-CHAIN's history, lambda, update count and running means at each
    task: after 6 updates with friction changes, its counts are those since the last change."""
    per_update, minibatch_steps = 256, 4 * 2
    kw = dict(env="Hopper-v4", friction_every=500, c_chain=True, checkpoint_every=0)
    run = main(small(tmp_path, steps=6 * per_update, **kw)).run_dir
    state = method_state(load(run), "c_chain", "policy")
    assert 1 <= state["updates"] < 6  # restarted at least once, not before the last update
    assert state["steps"] == minibatch_steps * state["updates"]  # restarted between updates
    assert state["coefficient"].tolist() == [100.0]  # lambda restarts; adapts from update 50


def test_ppo_upgd_is_the_authors_adaptive_upgd_with_their_settings():
    """--upgd: AdaptiveUPGD (core/run/rl/adaupgd.py) with the PPO script's lr 3e-4, eps 1e-5,
    betas (0.9, 0.999), weight decay 1e-3, sigma 1e-3 and utility beta 0.999; given values
    win."""
    args = resolve_args(Args(upgd=True, env="Hopper-v4", device="cpu"))
    assert (args.learning_rate, args.adam_eps, args.weight_decay) == (3e-4, 1e-5, 1e-3)
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)
    assert (args.upgd_sigma, args.upgd_beta_utility) == (1e-3, 0.999)
    seeds = seed_everything(args.seed, torch.device("cpu"))[1]
    gen = torch.Generator().manual_seed(0)
    agent = make_agent(args, 11, 3, torch.device("cpu"), seeds, gen)
    assert isinstance(agent.optimizer, AdaptiveUPGD)
    group = agent.optimizer.param_groups[0]
    assert (group["lr"], group["eps"], group["weight_decay"]) == (3e-4, 1e-5, 1e-3)
    assert tuple(group["betas"]) == (0.9, 0.999)
    given = resolve_args(Args(upgd=True, learning_rate=1e-4, weight_decay=0.0, device="cpu"))
    assert (given.learning_rate, given.weight_decay) == (1e-4, 0.0)
    adam = resolve_args(Args(device="cpu"))
    assert (adam.learning_rate, adam.adam_eps, adam.adam_beta1) == (1e-4, 1e-8, 0.99)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(replacement_rate=0.1), "--replacement-rate only applies with --method cbp"),
        (dict(noise_std=0.1), "--noise-std only applies with --method snp"),
        (dict(l2_init=0.1), "--l2-init only applies with --method l2_init"),
        (dict(weight_clipping=2.0), "--weight-clipping only applies with --method weight_clip"),
        (dict(redo_period=7), "--redo-period only applies with --method redo"),
    ],
)
def test_supervised_settings_of_unselected_methods_are_refused(settings, message):
    with pytest.raises(UsageError, match=message):
        resolve_method(MethodConfig(method="bp", **settings), SCR_DEFAULTS)


def test_both_entry_points_refuse_the_same_combinations():
    """One list of contradictions: TRAC with UPGD is refused on both (it ran on PPO before)."""
    with pytest.raises(UsageError, match="trac and upgd contradict"):
        resolve_method(MethodConfig(method="trac+upgd"), SCR_DEFAULTS)
    with pytest.raises(UsageError, match="--trac and --upgd contradict"):
        resolve_args(Args(trac=True, upgd=True, device="cpu"))


@pytest.mark.parametrize(
    "old, new, value",
    [
        ("--clip-kappa", "weight_clipping", 2.0),
        ("--shrink", "shrink_perturb_init", 0.25),
        ("--soft-shrink", "soft_shrink_perturb", 0.5),
        ("--reset-layers", "head_reset", 2),
    ],
)
def test_renamed_flags_still_parse(old, new, value):
    method = {
        "weight_clipping": "weight_clipping",
        "shrink_perturb_init": "snp_init",
        "soft_shrink_perturb": "soft_snp",
        "head_reset": "head_reset",
    }[new]
    cfg = parse(["slowly-changing-regression", "--method", method, old, str(value)])
    assert getattr(cfg.method, new) == value
    cfg = parse(
        ["slowly-changing-regression", "--method", method, "--" + new.replace("_", "-"), str(value)]
    )
    assert getattr(cfg.method, new) == value


def test_supervised_run_written_with_the_old_setting_names_resumes(tmp_path):
    """A run folder whose config and checkpoint name the settings as before
    (``clip_kappa``, ``shrink``, ...) resumes, and writes the rows of a run that never
    stopped."""
    m = MethodConfig(
        method="weight_clipping+snp_init", weight_clipping=2.0, shrink_perturb_init=0.5
    )
    kw = dict(method=m, seeds=[1], change_every=100)
    full = scr_config(tmp_path, "full", **kw)
    run_scr(full)
    part = scr_config(tmp_path, "part", **kw)
    run_scr(part, stop_after=1)
    old = {"weight_clipping": "clip_kappa", "shrink_perturb_init": "shrink"}
    path = part.out / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    config = json.loads(state["config"])
    for key in ("method", "resolved_method"):
        config[key] = {old.get(k, k): v for k, v in config[key].items()}
    state["config"] = json.dumps(config)
    torch.save(state, path)
    part.resume = True
    run_scr(part)
    from stacked_runs import read_rows

    assert read_rows(part.out, 1) == read_rows(full.out, 1)


def _legacy(state: dict, names: tuple[str, ...]) -> dict:
    """A PPO checkpoint's agent entries as written before the method suite."""
    entries = state.pop("suite")["methods"]

    def of(name, net):
        return next((e["state"] for e in entries if e["name"] == name and e["target"] == net), None)

    listed = [n for n in ppo_agent._LEGACY_ORDER if n in names]
    state["methods"] = {
        net: {"methods": [of(n, net) for n in listed]} for net in ("policy", "value")
    }
    unit = "cbp" if "cbp" in names else "redo"
    state["resetters"] = {net: of(unit, net) for net in ("policy", "value") if of(unit, net)}
    state["churn"] = of("c_chain", "policy")
    return state


@pytest.mark.parametrize(
    "flags",
    [
        dict(
            cbp=True, l2_init=1e-2, weight_clipping=3.0, maturity_threshold=4, replacement_rate=0.05
        ),
        dict(c_chain=True, soft_shrink_perturb=0.999, nap=True),
    ],
)
def test_ppo_checkpoints_from_before_the_suite_resume(tmp_path, flags):
    """A checkpoint whose methods' states sit under ``resetters``/``methods``/``churn`` loads
    into a fresh agent with every method's state as saved."""
    kw = dict(env="Hopper-v4", friction_every=500, checkpoint_every=0, **flags)
    run = main(small(tmp_path, steps=3 * 256, **kw)).run_dir
    state = load(run)
    args = resolve_args(small(tmp_path, **kw))
    seeds = seed_everything(args.seed, torch.device("cpu"))[1]
    fresh = make_agent(args, 11, 3, torch.device("cpu"), seeds, torch.Generator())
    saved = state["suite"]
    fresh.load_state_dict(_legacy(dict(state), fresh.methods.names))
    reloaded = fresh.methods.state_dict()
    assert [(e["name"], e["target"]) for e in reloaded["methods"]] == [
        (e["name"], e["target"]) for e in saved["methods"]
    ]
    for a, b in zip(reloaded["methods"], saved["methods"], strict=True):
        _assert_equal(a["state"], b["state"])


def _assert_equal(a, b) -> None:
    """Equal nested states: tensors bitwise, everything else with ``==``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_runs_with_the_old_setting_names_pool_with_new_ones_in_the_figures(tmp_path):
    """scripts/plot.py groups seeds by configuration: a run whose config.json names a setting
    as before (``clip_kappa``) is the same configuration as one naming it now."""
    from ppo_cbp.reporting.figures import _read_config, group_key

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    resolved = {"method": "weight_clipping", "lr": 0.01}
    old.write_text(json.dumps({"resolved_method": {**resolved, "clip_kappa": 2.0}, "seed": 0}))
    new.write_text(json.dumps({"resolved_method": {**resolved, "weight_clipping": 2.0}, "seed": 1}))
    assert group_key(_read_config(old)) == group_key(_read_config(new))
