"""What a PPO run logs after each update: the update's statistics (one host sync), the
plasticity metrics of both networks, the per-update scalars, and their writing to TensorBoard
with the progress bar. ``ppo_cbp/train.py`` calls these at the end of every update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.metrics import plasticity_metrics, policy_churn, policy_kl
from ppo_cbp.ppo import run as ppo_run
from ppo_cbp.ppo.agent import Agent
from ppo_cbp.ppo.numerics import LOG_2PI

__all__ = [
    "initial_plasticity_scalars",
    "plasticity_scalars",
    "update_scalars",
    "update_statistics",
    "write_scalars",
]


def update_statistics(
    args: Any, log_std: Tensor, losses: Tensor, log_ratios: Tensor, changes: Tensor
) -> tuple[float, float, float, float, float, bool]:
    """Mean policy and value losses, CleanRL's approx_kl ``E[(r - 1) - log r]`` and the clip
    fraction over the update's minibatches, the policy's entropy after the update, and whether
    all were finite: one host sync."""
    ratios = log_ratios.exp()
    entropy = log_std.detach().sum() + 0.5 * log_std.shape[0] * (1.0 + LOG_2PI)
    stats = torch.cat(
        (
            losses.mean(0),
            ((ratios - 1) - log_ratios).mean().view(1),
            ((ratios - 1).abs() > args.clip_coef).float().mean().view(1),
            entropy.view(1),
            torch.isfinite(losses).all().view(1),
            torch.isfinite(log_ratios).all().view(1),
            torch.isfinite(changes).all().view(1),
        )
    )
    *means, ok_losses, ok_ratios, ok_changes = stats.tolist()
    return (*means, ok_losses and ok_ratios and ok_changes)


def initial_plasticity_scalars(agent: Agent, b_obs: Tensor) -> dict[str, float]:
    """``plasticity/{policy,value}/...`` of the networks as initialised, on the first rollout's
    states, logged at step 0 (update 0): the metrics of :func:`plasticity_metrics` and no units
    replaced; the quantities of an update (weight change, gradient norm, churn, KL) have none
    yet."""
    metric_tensors = {
        f"plasticity/{name}/{key}": v
        for name, net in agent.sequential_networks()
        for key, v in plasticity_metrics(net, b_obs).items()
    }
    keys = list(metric_tensors)
    values = torch.stack([metric_tensors[k].to(torch.float64) for k in keys]).tolist()
    scalars = dict(zip(keys, values))
    for name, _ in agent.sequential_networks():
        scalars[f"plasticity/{name}/units_replaced"] = 0
    return scalars


def plasticity_scalars(
    agent: Agent,
    state: ppo_run.RunState,
    b_obs: Tensor,
    grad_norms: Tensor,
    policy_before: tuple[Tensor, Tensor],
) -> dict[str, float]:
    """``plasticity/{policy,value}/...`` on the rollout's states (:func:`plasticity_metrics`),
    the largest weight change since the last log, the last minibatch's gradient norms
    (``grad_norms``), the policy's churn and KL over the update (from its means and log-std
    before it, ``policy_before``) and the units replaced so far."""
    metric_tensors: dict[str, Tensor] = {}
    for j, (name, net) in enumerate(agent.sequential_networks()):
        for key, v in plasticity_metrics(net, b_obs).items():
            metric_tensors[f"plasticity/{name}/{key}"] = v
        metric_tensors[f"plasticity/{name}/max_weight_change"] = state.max_change[j]
        metric_tensors[f"plasticity/{name}/gradient_norm"] = grad_norms[j]
    with torch.no_grad():
        mean_after = agent.actor(b_obs)
    mean_before, log_std_before = policy_before
    metric_tensors["plasticity/policy/churn"] = policy_churn(mean_before, mean_after)
    metric_tensors["plasticity/policy/kl"] = policy_kl(
        mean_before, log_std_before, mean_after, agent.log_std.detach()
    )
    keys = list(metric_tensors)
    values = torch.stack([metric_tensors[k].to(torch.float64) for k in keys]).tolist()
    scalars = dict(zip(keys, values))
    replaced = agent.units_replaced
    for name, _ in agent.sequential_networks():
        scalars[f"plasticity/{name}/units_replaced"] = replaced.get(name, 0)
    state.max_change = torch.zeros_like(state.max_change)
    return scalars


def update_scalars(
    args: Any, envs: Any, stats: Sequence[float], explained_var: float, lr: float, sps: float
) -> dict[str, float]:
    """The scalars of every update: speed, learning rate, the update's ``stats`` (from
    :func:`update_statistics`), the explained variance and, with friction changes, env 0's
    current friction coefficient and the other changed quantities' multipliers."""
    names = ("policy_loss", "value_loss", "approx_kl", "clipfrac", "entropy")
    scalars = {"charts/SPS": sps, "charts/learning_rate": lr}
    scalars.update({f"losses/{name}": v for name, v in zip(names, stats)})
    scalars["losses/explained_variance"] = explained_var
    if args.friction_every > 0:  # env 0's values: friction's coefficient, the multipliers
        scalars.update({f"env/{q}": float(v) for q, v in envs.call("values")[0].items()})
    return scalars


def write_scalars(
    writer: Any, bar: Any, rollout: Any, state: ppo_run.RunState, scalars: dict, timings: dict
) -> None:
    """The returns and lengths of the episodes that ended in the rollout (at their own steps),
    then ``scalars`` and ``perf/*_fraction`` (each phase's share of the wall time so far,
    ``timings["total"]``) at the current step; then the progress bar moves past the rollout."""
    for s, r_ep, l_ep in rollout.episodes:
        writer.add_scalar("charts/episodic_return", r_ep, s)
        writer.add_scalar("charts/episodic_length", l_ep, s)
    for key in ("env", "acting", "update", "cbp", "metrics"):
        scalars[f"perf/{key}_fraction"] = timings[key] / timings["total"]
    for key, v in scalars.items():
        writer.add_scalar(key, v, state.global_step)
    postfix = f"return {state.latest_return:.1f}"
    if "env/friction" in scalars:
        postfix += f", friction {scalars['env/friction']:.3g}"
    bar.set_postfix_str(postfix, refresh=False)  # update() redraws the bar with it
    bar.update(rollout.rew.size)
