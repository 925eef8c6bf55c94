"""The plasticity methods of ppo_cbp/plasticity on PPO: each acts, and a run interrupted and
resumed equals one that never stopped (every method's state checkpointed)."""

import pytest
import torch
from test_train import assert_same_state, deterministic, load, scalars, small

from ppo_cbp.errors import UsageError
from ppo_cbp.ppo.agent import method_state
from ppo_cbp.ppo.numerics import AdamStep
from ppo_cbp.train import Args, main

# Short runs with friction changes every 700 steps: task boundaries within a few updates.
PPO_METHODS = {
    "l2_init+parseval+weight_clipping": dict(l2_init=1e-2, parseval=1e-3, weight_clipping=3.0),
    "soft_snp+snp_init": dict(soft_shrink_perturb=0.999, shrink_perturb_init=0.5),
    "head_reset+adam_reset+cbp": dict(
        head_reset=1, adam_reset=True, cbp=True, maturity_threshold=4, replacement_rate=0.05
    ),
    "layer_norm+cbp": dict(layer_norm=True, cbp=True, maturity_threshold=4, replacement_rate=0.05),
    "nap+crelu+redo": dict(nap=True, crelu=True, redo=True, redo_period=2, redo_threshold=0.5),
    "layer_norm+dff+cbp": dict(
        layer_norm=True, dff=True, cbp=True, maturity_threshold=4, replacement_rate=0.05
    ),
    "upgd+cbp": dict(upgd=True, cbp=True, maturity_threshold=4, replacement_rate=0.05),
    "trac+cbp+adam_reset": dict(
        trac=True, cbp=True, adam_reset=True, maturity_threshold=4, replacement_rate=0.05
    ),
    "injection": dict(injection=True),
    "c_chain": dict(c_chain=True),
    "injection+c_chain": dict(injection=True, c_chain=True),
}


def _acted(name: str, state: dict) -> None:
    """What each method must have left in the checkpoint of a run with friction changes."""
    actor = state["actor"]
    if "injection" in name:
        assert method_state(state, "injection", "policy")["injections"] >= 1
        assert any(k.startswith("trainable.") for k in actor)
    if "c_chain" in name:
        assert method_state(state, "c_chain", "policy")["updates"] >= 1
    if "l2_init" in name:  # theta_0 kept for resuming
        assert len(method_state(state, "l2_init", "policy")["initial"]) == 6
    if "cbp" in name:
        assert method_state(state, "cbp", "policy")["num_replaced"] > 0
    if "layer_norm" in name or "nap" in name:
        assert any(k.endswith(".weight") and actor[k].dim() == 1 for k in actor)
    if "upgd" in name:  # the optimizer's utility traces and noise generator are checkpointed
        assert "generators" in state["optimizer"]
        assert all("avg_utility" in st for st in state["optimizer"]["state"].values())
    if "trac" in name:  # the tuners' state and the reference point are checkpointed
        assert state["optimizer"]["s"].shape == (1, 6) and state["optimizer"]["reference"]
    if "crelu" in name or "dff" in name:  # the output layer takes both outputs of each unit
        weights = [k for k in actor if k.endswith("weight") and actor[k].dim() == 2]
        assert actor[weights[-1]].shape[1] == 2 * Args().hidden_sizes[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PPO_METHODS))
def test_method_run_resumes_exactly(tmp_path, name):
    kw = dict(env="Hopper-v4", friction_every=700, checkpoint_every=0, **PPO_METHODS[name])
    per_update = 256
    full = main(small(tmp_path, run_name="full", steps=6 * per_update, **kw))
    run = main(small(tmp_path, run_name="part", steps=3 * per_update, **kw)).run_dir
    resumed = main(Args(resume=str(run), steps=6 * per_update))
    assert resumed.global_step == 6 * per_update
    a_state, b_state = load(full.run_dir), load(run)
    assert_same_state(a_state, b_state)
    _acted(name, b_state)
    a, b = deterministic(scalars(full.run_dir)), deterministic(scalars(run))
    assert sorted(a) == sorted(b)
    for tag in a:
        assert a[tag] == b[tag], tag


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(l2_init=-1.0), "--l2-init must be >= 0"),
        (dict(soft_shrink_perturb=1.5), "--soft-shrink-perturb must be in"),
        (dict(head_reset=4), "--head-reset must be in"),
        (dict(injection=True, head_reset=1), "--head-reset and --injection contradict"),
        (dict(layer_norm=True, nap=True), "--layer-norm and --nap contradict"),
        (dict(upgd=True, standard_adam=True), "--upgd has its own betas"),
        (dict(trac=True, injection=True), "--injection and --trac contradict"),
        (dict(trac=True, upgd=True), "--trac and --upgd contradict"),
        (dict(upgd_sigma=0.1), "--upgd-sigma only applies with --upgd"),
        (dict(replacement_rate=0.1), "--replacement-rate only applies with --cbp"),
        (dict(injection_layers=1), "--injection-layers only applies with --injection"),
        (dict(injection=True, crelu=True), "does not take"),
        (dict(injection=True, dff=True), "does not take --layer-norm, --nap, --crelu or --dff"),
        (dict(crelu=True, dff=True), "--crelu and --dff contradict"),
        (dict(redo=True, dff=True), "--dff and --redo contradict .*never dormant"),
        (dict(nap=True, dff=True), "--dff and --nap contradict"),
        (dict(adam_reset=True, friction_every=0), "no friction changes"),
    ],
)
def test_bad_method_settings_are_one_error(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        main(small(tmp_path, **flags))
    assert not any(tmp_path.iterdir())


def test_injection_refuses_unit_resets(tmp_path):
    for flag in ("cbp", "redo"):
        with pytest.raises(
            UsageError,
            match=f"--{flag} and --injection contradict|--injection and --{flag} contradict",
        ):
            main(small(tmp_path, injection=True, **{flag: True}))
    assert not any(tmp_path.iterdir())


def test_injected_run_trains_the_branch_not_its_frozen_copy(tmp_path):
    """theta'_0 keeps the draw of the injection; theta' (same draw then) has moved since."""
    run = main(small(tmp_path, env="Hopper-v4", steps=2048, friction_every=300, injection=True))
    actor = load(run.run_dir)["actor"]
    last = max(int(k.split(".")[1]) for k in actor if k.startswith("trainable."))
    keys = [k for k in actor if k.startswith(f"trainable.{last}.")]
    assert keys
    assert not all(torch.equal(actor[k], actor[k.replace("trainable.", "frozen.")]) for k in keys)


def test_adam_step_follows_parameters_that_join_and_leave_the_optimizer():
    """The trainer's lean Adam step after the optimizer's groups change (a plasticity injection
    freezes the head and adds a branch) equals torch's Adam on the same groups."""
    torch.manual_seed(0)
    body, head, branch = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    kw = dict(lr=0.01, betas=(0.99, 0.99), weight_decay=1e-3)
    fused = torch.optim.Adam([body, head], fused=True, **kw)
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in (body, head, branch)]
    reference = torch.optim.Adam(reference_params[:2], **kw)
    step = AdamStep(fused)

    g = torch.Generator().manual_seed(1)

    def step_both(ours, theirs):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        step()
        reference.step()

    for _ in range(3):
        step_both([body, head], reference_params[:2])
    # the head leaves (frozen), the branch joins with fresh state
    for opt, (_, h, br) in ((fused, (body, head, branch)), (reference, reference_params)):
        group = opt.param_groups[0]["params"]
        del group[next(i for i, p in enumerate(group) if p is h)]
        opt.state.pop(h)
        h.requires_grad_(False)
        opt.add_param_group({"params": [br]})
    for _ in range(3):
        step_both([body, branch], [reference_params[0], reference_params[2]])
    for p, q in zip((body, head, branch), reference_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert fused.state[branch]["step"] == 3


def test_new_plasticity_scalars_are_measured(tmp_path):
    """Feature norm, gradient norm, policy churn and KL reach TensorBoard with sane values."""
    run = main(small(tmp_path, env="Hopper-v4", steps=1024, metrics_every=1))
    s = scalars(run.run_dir)
    for net in ("policy", "value"):
        assert all(v > 0 for _, v in s[f"plasticity/{net}/gradient_norm"])
        assert all(v > 0 for _, v in s[f"plasticity/{net}/feature_norm"])
    # an update moves the policy: churn and KL are positive, and KL >= 0 by definition
    assert all(v > 0 for _, v in s["plasticity/policy/churn"])
    assert all(v > 0 for _, v in s["plasticity/policy/kl"])
    assert len(s["plasticity/policy/churn"]) == 4
