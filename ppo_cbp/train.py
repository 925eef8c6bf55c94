"""PPO with continual backprop on friction-changing MuJoCo, in the order of CleanRL's
``ppo_continuous_action.py``: ``Args``, the environments, the rollout, GAE and the PPO update,
then ``main()``, the algorithm's outline. What is not PPO lives beside it: the agent and its
plasticity methods (built by the method suite) in :mod:`ppo_cbp.ppo.agent`, the run's seeding,
state, checkpoints and summary in :mod:`ppo_cbp.ppo.run`, the settings' checks in
:mod:`ppo_cbp.ppo.settings`, the fast numerics in :mod:`ppo_cbp.ppo.numerics`, what is logged
in :mod:`ppo_cbp.ppo.scalars`, the vector env in :mod:`ppo_cbp.envs.vector`.

Usage::

    python ppo_cbp/train.py --env Ant-v4 --cbp --steps 100_000_000
    python ppo_cbp/train.py --resume runs/<run_name>    # continue, or extend with a larger --steps
    tensorboard --logdir runs

The defaults are the paper's PPO (the official code's Ant configuration, each value in ``--help``)
except in three places that ``--paper-exact`` restores, as the README explains. A run writes
TensorBoard events (the README lists the tags), ``config.json`` and an atomic ``checkpoint.pt``
to ``runs/<run_name>/``; on CPU a resumed run gives the same weights and metrics as an
uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

if __package__ in (None, ""):
    # Run as a script: import the package from the repository root, and not this directory's
    # modules (metrics, init, units, ...) as top-level modules that could shadow others.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import ppo_cbp.envs.vector as vector_env
from ppo_cbp import run_folder
from ppo_cbp.cli import parse as cli_parse
from ppo_cbp.cli import report_error
from ppo_cbp.errors import UsageError
from ppo_cbp.init import Scheme
from ppo_cbp.metrics import (
    WeightChangeTracker,
    gradient_norm,
)
from ppo_cbp.ppo import run as ppo_run
from ppo_cbp.ppo import settings as ppo_settings
from ppo_cbp.ppo.agent import Agent, make_agent
from ppo_cbp.ppo.environments import Segments, make_env
from ppo_cbp.ppo.numerics import (
    LOG_2PI,
    AdamStep,
    GaussianActing,
    hidden_taps,
    ppo_loss_and_grads,
    ppo_loss_autograd,
)
from ppo_cbp.ppo.scalars import (
    initial_plasticity_scalars,
    plasticity_scalars,
    update_scalars,
    update_statistics,
    write_scalars,
)


@dataclass
class Args:
    """PPO (+ continual backprop, ReDo, L2, Shrink & Perturb and the other plasticity methods) on friction-changing MuJoCo.

    Examples::

        python ppo_cbp/train.py --env Hopper-v4 --cbp --steps 1_000_000     # a new run in runs/
        python ppo_cbp/train.py --resume runs/<run_name> --steps 2_000_000  # continue, extend
        tensorboard --logdir runs                                           # its curves
    """

    # ---- experiment
    env: str = "Ant-v4"
    """Environment id: Ant, Hopper or Walker2d, -v4 or -v5 (any gymnasium MuJoCo id of version >= 4 works). Ant-v5's default observation (105 dims) includes contact forces, Ant-v4's (27) does not."""
    steps: int = 100_000_000
    """Total environment steps (over all envs). Training stops at the first update boundary at or after this many steps."""
    seed: int = 1
    """Seed of everything: network init, action noise, minibatch order, CBP/ReDo draws, the friction sequence; env i is reset with seed + i."""
    num_envs: int = 1
    """Parallel environments. With N > 1, env 0 steps in the trainer's process and envs 1..N-1 in one worker process each. The rollout has num_steps steps per env. More envs pay when the env steps dominate (small networks) and there is an idle core per env; on a busy machine they cost more than they gain."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the networks live: auto = cuda if available, else cpu."""
    threads: int | None = None
    """torch threads of this process (the minibatch update). Default: one per env, up to the cores this process may use: the update runs while the env workers sleep, so their cores are free; with one env, 1 thread is fastest for these small networks and lets runs share a machine."""
    run_name: str | None = None
    """Run directory name under runs_dir; default <env>__<label>__s<seed>__<YYYYmmdd-HHMMSS> (local start time), the label being the methods and the settings that differ from their defaults, e.g. Hopper-v4__cbp+layer_norm__replacement_rate=0.001__s1__20261207-101500."""
    runs_dir: str = "runs"
    """Parent directory of run directories."""
    resume: str | None = None
    """Continue the run in this directory (runs/<run_name>) from its checkpoint. Settings not given on the command line are taken from the checkpoint; given ones must match it, except steps, checkpoint_every, metrics_every, device, threads and progress. A finished run continues with a larger --steps."""
    checkpoint_every: int = 1_000_000
    """Write a checkpoint at the first update boundary after every this many steps (0: only at the end, on SIGINT/SIGTERM and on a non-finite loss)."""
    metrics_every: int = 10
    """Log the plasticity metrics every this many updates (0: never)."""
    progress: bool = True
    """Show a progress bar on a terminal (percentage, steps, rate, ETA, latest return, friction); none when stderr is not a terminal."""

    # ---- PPO
    num_steps: int = 2048
    """Rollout length per env between updates."""
    num_minibatches: int = 16
    """Minibatches per epoch; must divide num_steps * num_envs."""
    update_epochs: int = 10
    """Passes over the rollout per update."""
    learning_rate: float | None = None
    """Step size; default 1e-4 (the paper's Adam), 3e-4 with --upgd (the UPGD authors' PPO script, core/run/rl/ppo_continuous_action_upgd.py of mohmdelsayed/upgd) or --kron (Plasticine's)."""
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over the run (CleanRL's option; off in the paper)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float = 0.2
    """PPO ratio clipping epsilon."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (0 in the paper)."""
    vf_coef: float = 1.0
    """Coefficient of the value loss mean((V - R)^2) (1 in the paper; CleanRL's 0.5 * 0.5 would be 0.25 here)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value; None (default, the paper): no clipping."""
    norm_adv: bool = True
    """Normalise advantages to mean 0, std 1 over the whole batch (the paper's code)."""
    bootstrap_truncation: bool = True
    """Bootstrap from V(final observation) at time-limit truncations. --no-bootstrap-truncation treats truncations as terminations, as the paper's code did."""
    clip_actions: bool = False
    """Clip actions to the action space before stepping the env (CleanRL's ClipAction). Off, as in the paper: MuJoCo clamps the controls, but the control cost sees the raw Gaussian sample."""
    normalize_obs: bool = False
    """Normalise observations with a running mean/std (clipped to +-10), checkpointed."""
    normalize_reward: bool = False
    """Scale rewards by the running std of the discounted return (clipped to +-10), checkpointed."""

    # ---- networks and optimizer
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Widths of the hidden ReLU layers of both the policy-mean and the value network."""
    init: Scheme = "lecun_uniform"
    """Weight init of every layer (output layers too); biases start at 0. CBP/ReDo redraw replaced units from the same distribution."""
    log_std_init: float = 0.0
    """Initial value of the state-independent log standard deviation of the policy."""
    adam_beta1: float | None = None
    """Adam beta1; default 0.99 (the paper's tuned Adam), 0.9 with --standard-adam or --upgd (the UPGD authors' AdaptiveUPGD default)."""
    adam_beta2: float | None = None
    """Adam beta2; default 0.99 (the paper's tuned Adam), 0.999 with --standard-adam or --upgd."""
    adam_eps: float | None = None
    """Adam epsilon; default 1e-8, 1e-5 with --upgd (the UPGD authors' PPO script)."""
    weight_decay: float | None = None
    """Weight decay: Adam's coupled L2, or UPGD's decoupled (1 - lr wd) shrink. Default 0, or 1e-4 with --cbp/--redo/--shrink-perturb, 1e-3 with --l2 or --upgd (the UPGD authors' PPO script)."""

    # ---- methods
    cbp: bool = False
    """Continual backprop on both networks after every minibatch step (implies weight decay 1e-4 unless given)."""
    replacement_rate: float = 1e-4
    """CBP: fraction of the eligible units replaced per minibatch update (an optimizer step: update_epochs * num_minibatches of them per rollout; not an environment step), in [0, 1]."""
    maturity_threshold: int = 10_000
    """CBP: a unit can be replaced once it is older than this many minibatch updates (optimizer steps, not environment steps)."""
    decay_rate: float = 0.99
    """CBP: decay of the running utility, in [0, 1) (0 = instantaneous utility)."""
    utility: Literal["contribution", "adaptable_contribution"] = "contribution"
    """CBP: utility measure (the paper's PPO uses contribution)."""
    redo: bool = False
    """ReDo on both networks (implies weight decay 1e-4 unless given)."""
    redo_threshold: float = 0.1
    """ReDo: tau; units with tau-dormant score <= tau are reset."""
    redo_period: int = 100
    """ReDo: reset dormant units every this many minibatch updates (optimizer steps, not environment steps)."""
    reset_optimizer_state: bool = True
    """CBP/ReDo: zero the Adam moments of reset entries (the paper's code did not)."""
    l2: bool = False
    """The paper's L2 baseline: weight decay 1e-3."""
    shrink_perturb: bool = False
    """Shrink & Perturb: weight decay (default 1e-4) plus N(0, noise_std^2) noise added to every network weight and bias after each optimizer step."""
    noise_std: float | None = None
    """Shrink & Perturb noise std; default 1e-5."""
    l2_init: float = 0.0
    """L2-Init (Kumar et al. 2023): lambda of (lambda/2) ||theta - theta_0||^2 on both networks' parameters (0: off; the authors' best, 1e-2)."""
    parseval: float = 0.0
    """Parseval regularisation (Chung et al. 2024): lambda of lambda ||W W^T - s I||_F^2 on the hidden layers (0: off; the authors' 1e-3)."""
    weight_clipping: float = 0.0
    """Weight clipping (Elsayed et al. 2024): kappa, every weight kept within kappa times its layer's init bound (0: off; the authors' PPO used 3)."""
    soft_shrink_perturb: float = 1.0
    """Soft Shrink & Perturb (Juliani & Ash 2024): alpha of theta <- alpha theta + (1 - alpha) theta_fresh after every update (1: off; the authors' 0.999999)."""
    shrink_perturb_init: float = 1.0
    """Shrink & Perturb toward a fresh init (Ash & Adams 2020) at every friction change: its alpha (1: off; the authors' 0.5)."""
    head_reset: int = 0
    """Reinitialise the last this many Linear layers of both networks at every friction change (Nikishin et al. 2022; 0: off)."""
    adam_reset: bool = False
    """Reset Adam's moments and step count at every friction change."""
    layer_norm: bool = False
    """LayerNorm between every hidden Linear layer and its activation in both networks (Lyle et al. 2024)."""
    nap: bool = False
    """Normalize-and-Project (Lyle et al. 2024): LayerNorm as --layer-norm, and every weight matrix projected back to its initial norm after each update."""
    crelu: bool = False
    """CReLU (Abbas et al. 2023) as the hidden activation of both networks: concat(relu(x), relu(-x)), each next layer taking twice the width."""
    dff: bool = False
    """Deep Fourier features (Lewandowski et al. 2024; Plasticine's DFF4Linear) as the hidden activation of both networks: concat(sin(x), cos(x)), each next layer taking twice the width."""
    upgd: bool = False
    """UPGD (Elsayed & Mahmood 2024) instead of Adam: the authors' Adam-style AdaptiveUPGD for PPO (core/run/rl/adaupgd.py of mohmdelsayed/upgd), with their PPO script's lr 3e-4, eps 1e-5, betas (0.9, 0.999) and weight decay 1e-3 unless given. Their script also clips the gradient norm at 0.5 and anneals the step size to 0 (CleanRL's defaults, which their Adam baseline shares): add --max-grad-norm 0.5 --anneal-lr for that; off here, as for every other method."""
    upgd_sigma: float = 1e-3
    """UPGD: standard deviation of the perturbation (the authors' PPO script's 1e-3)."""
    upgd_beta_utility: float = 0.999
    """UPGD: decay of the utility trace, in [0, 1) (the authors' PPO script's 0.999)."""
    kron: bool = False
    """PSGD Kron (Li 2018) instead of Adam, as the plasticity library Plasticine runs it (RLE-Foundation/Plasticine): kron_torch's Kron (evanatyourservice/kron_torch) with its defaults (momentum 0.9, preconditioner step 0.1, update probability annealed from 1 to 0.03 after 500 steps, triangular factors up to width 8192, update RMS clipped at 1.1) and lr 3e-4 unless given (Plasticine's continual DMC PPO, also kron_torch's default); --weight-decay is Kron's own (added to the preconditioned step of weight matrices), default 0 as Plasticine's. Adam's betas and eps are unused."""
    trac: bool = False
    """TRAC (Muppidi et al. 2024) around the optimizer: its updates scaled by the parameter-free tuners (the authors' betas, s_prior 1e-8)."""
    injection: bool = False
    """Plasticity injection (Nikishin et al. 2023) into both networks' heads (their last --injection-layers Linear layers) at every friction change."""
    injection_layers: int = 2
    """Plasticity injection: how many of the last Linear layers form the injected head (2: the paper's Atari head of two fully connected layers)."""
    c_chain: bool = False
    """C-CHAIN churn reduction (Tang et al. 2025) on the policy mean, with the authors' PPO defaults (target relative loss 0.05)."""
    standard_adam: bool = False
    """Standard Adam betas (0.9, 0.999): the paper's failing baseline."""
    paper_exact: bool = False
    """The released code's behaviour where the defaults deliberately differ: no bootstrap at time-limit truncations, no optimizer-state reset by CBP/ReDo, and CBP replacing one unit with probability rho * (eligible units) per minibatch update instead of accumulating the count (overrides --bootstrap-truncation and --reset-optimizer-state)."""

    # ---- friction
    friction_every: int = 2_000_000
    """Change friction (and every other change below) after every this many total steps: the segment length (0: the standard, stationary env)."""
    friction_low: float = 0.02
    """Lower end of the log-uniform friction range."""
    friction_high: float = 2.0
    """Upper end of the log-uniform friction range."""
    friction_at_episode_boundary: bool = True
    """Change at the first episode boundary once due (the paper); off: exactly at the step."""
    friction_start_default: bool = False
    """Run the first segment with the model's default friction (and default values of every other change) instead of the first sample."""
    friction_table: Literal["drawn", "paper"] | None = None
    """Friction sequence: drawn (log-uniform, PCG64(seed)) or paper (the released code's table, lop/rl/cfg/frictions of shibhansh/loss-of-plasticity: row --seed 0-99, one of 50 values per segment, column 0 first). Default: paper with --paper-exact on a friction-changing Ant (the released slippery-Ant runs), else drawn (the released Hopper, Walker2d and Ant configurations are stationary: --friction-every 0)."""
    dynamics: tuple[str, ...] = ("friction",)
    """What changes per segment, one or several of: friction (absolute coefficient, the paper's), gravity (its magnitude), mass (body masses with their inertias), damping (every dof's), gear (every actuator's); all but friction are multipliers of the model's own values, log-uniform in --dynamics-range. none: only the observation/reward changes."""
    dynamics_range: tuple[str, ...] = ()
    """Multiplier ranges, QUANTITY=LOW,HIGH (e.g. gravity=0.8,1.25). Default 0.5,2 for each: a factor 2 either way, covering CARL's widest context variation (relative std 0.5; Benjamins et al., TMLR 2023)."""
    dynamics_drift: bool = False
    """Drift linearly from each segment's values to the next over the segment instead of jumping (a segment's start stays the task boundary)."""
    obs_permute: bool = False
    """Permute the observation vector per segment (a uniformly random permutation, Permuted MNIST's change applied to the state)."""
    obs_offset: float = 0.0
    """Std of a per-segment offset N(0, std^2 I) added to the observation (0: none; 1 is the size of a normalised feature, our choice)."""
    reward_flip: bool = False
    """Negate the forward-velocity reward term in every other segment (odd ones), the other terms unchanged."""
    eval_every: int = 0
    """Evaluate the deterministic policy (mean action) in separate envs every this many steps (at the next update boundary) and at each segment's end: eval/return (0: never)."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    eval_previous: int = 0
    """Also evaluate with the settings of the previous k segments: eval/return_previous (their mean)."""
    track: bool = False
    """Also log the config and scalars to Weights & Biases (pip install -e '.[wandb]')."""
    wandb_project_name: str = "ppo_cbp"
    """W&B project of --track."""
    wandb_entity: str | None = None
    """W&B entity (team) of --track; None: yours."""
    capture_video: bool = False
    """Render episodes of the deterministic policy to videos/<step>.mp4 (pip install -e '.[video]')."""
    video_every: int = 1_000_000
    """Steps between --capture-video's videos (also at step 0 and each segment's end)."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/Inf; the last good state was checkpointed."""


# --- rollout --------------------------------------------------------------------------------------


class Rollout:
    """The rollout's buffers ``[T, N, ...]`` (numpy, with torch views) and its acting."""

    def __init__(self, args: Args, obs_dim: int, act_dim: int, agent: Agent):
        T, N = args.num_steps, args.num_envs
        self.obs = np.zeros((T, N, obs_dim), np.float32)
        self.act = np.zeros((T, N, act_dim), np.float32)
        self.rew = np.zeros((T, N), np.float64)
        self.term = np.zeros((T, N), bool)
        self.trunc = np.zeros((T, N), bool)
        self.obs_host, self.act_host = torch.from_numpy(self.obs), torch.from_numpy(self.act)
        self.acting = GaussianActing(agent.actor, agent.log_std, N)
        self.noise: Tensor | None = None
        self.finals: list[tuple[int, int, np.ndarray]] = []  # (t, env, final obs) at truncations
        self.episodes: list[tuple[int, float, int]] = []  # (step, return, length) of ended ones
        self.env_time = 0.0


def collect_rollout(
    args: Args,
    envs: Any,
    agent: Agent,
    state: ppo_run.RunState,
    rollout: Rollout,
    gen: torch.Generator,
) -> None:
    """Step the envs ``num_steps`` times with the current policy into ``rollout``, with Gaussian
    noise drawn for the whole rollout at once (:class:`GaussianActing`)."""
    T, N = args.num_steps, args.num_envs
    step0 = state.global_step
    rollout.finals, rollout.episodes, rollout.env_time = [], [], 0.0
    envs.wake()
    with torch.inference_mode():
        rollout.noise = torch.randn(
            (T, N, rollout.act.shape[2]), generator=gen, device=agent.log_std.device
        )
        rollout.acting.start(rollout.noise)
        for t in range(T):
            rollout.obs[t] = state.next_obs
            rollout.acting.act(t, rollout.obs[t], rollout.act[t])
            action = rollout.act[t]
            if args.clip_actions:
                action = np.clip(
                    action, envs.single_action_space.low, envs.single_action_space.high
                )
            t_env = time.perf_counter()
            raw_obs, reward, terminated, truncated, final = envs.step(action)
            rollout.env_time += time.perf_counter() - t_env
            rollout.term[t] = terminated
            rollout.trunc[t] = truncated
            state.episode_return += reward
            state.episode_length += 1
            rollout.rew[t] = state.scale_reward(reward, args.gamma)
            for i, fo in final:
                if truncated[i] and not terminated[i]:
                    rollout.finals.append((t, i, state.normalize_obs(fo[None], False)[0]))
                rollout.episodes.append((step0 + (t + 1) * N, *state.end_episode(i)))
            state.next_obs = state.normalize_obs(raw_obs, True).astype(np.float32)
    state.global_step += T * N


# --- ALGO LOGIC: GAE (bootstrap value if not done) ------------------------------------------------


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminations: np.ndarray,
    truncations: np.ndarray,
    gamma: float,
    gae_lambda: float,
    bootstrap_truncation: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and value targets for a rollout ``[T, N]``, in float64.

    With ``d_t = terminated_t or truncated_t`` (the episode ends at step t) and ``s'_t`` the true
    next state of step t (the final observation when the episode ended there, else ``s_{t+1}``),
    ``next_values[t] = V(s'_t)``. The bootstrap is cut at terminations, and also at truncations
    when ``bootstrap_truncation`` is False (the paper's code):

        b_t      = terminated_t                 if bootstrap_truncation else d_t
        delta_t  = r_t + gamma * (1 - b_t) * V(s'_t) - V(s_t)
        A_t      = delta_t + gamma * lambda * (1 - d_t) * A_{t+1},   A_T = 0
        R_t      = A_t + V(s_t)

    The last step of the rollout bootstraps through ``delta`` from ``next_values[T-1]`` (the
    value of the observation after the rollout).

    :param rewards, values, next_values: float arrays ``[T, N]``.
    :param terminations, truncations: bool arrays ``[T, N]``.
    :return: ``(advantages, returns)``, float64 arrays ``[T, N]``.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    next_values = np.asarray(next_values, dtype=np.float64)
    terminations = np.asarray(terminations, dtype=bool)
    truncations = np.asarray(truncations, dtype=bool)
    if len({x.shape for x in (rewards, values, next_values, terminations, truncations)}) != 1:
        raise ValueError(
            "rewards, values, next_values, terminations, truncations need one shape [T, N]"
        )
    ends = terminations | truncations
    cut = terminations if bootstrap_truncation else ends
    deltas = rewards + gamma * np.where(cut, 0.0, next_values) - values
    carries = np.where(ends, 0.0, gamma * gae_lambda)
    advantages = np.empty_like(deltas)
    # Python floats (IEEE doubles, as numpy's) beat a numpy op per step for these short columns.
    for n in range(deltas.shape[1]):
        acc, backwards = 0.0, []
        for delta, carry in zip(deltas[::-1, n].tolist(), carries[::-1, n].tolist()):
            acc = delta + carry * acc
            backwards.append(acc)
        advantages[:, n] = backwards[::-1]
    return advantages, advantages + values


def rollout_targets(
    args: Args, agent: Agent, state: ppo_run.RunState, rollout: Rollout
) -> tuple[Tensor, np.ndarray, np.ndarray, float]:
    """The rollout's states on the device ``[T * N, obs_dim]``, GAE advantages and returns
    ``[T, N]`` (:func:`compute_gae`) and the explained variance of the returns by the values."""
    T, N = args.num_steps, args.num_envs
    device = agent.log_std.device
    with torch.no_grad():
        b_obs = rollout.obs_host.to(device).reshape(T * N, -1)
        last = torch.from_numpy(state.next_obs).to(device)
        values_all = agent.critic(torch.cat([b_obs, last])).view(T + 1, N)
        final_values = None
        if rollout.finals and args.bootstrap_truncation:
            fo = torch.from_numpy(np.stack([f for _, _, f in rollout.finals]).astype(np.float32))
            final_values = agent.critic(fo.to(device)).view(-1).cpu().numpy()
    values_np = values_all.cpu().numpy().astype(np.float64)
    v, next_v = values_np[:-1], values_np[1:].copy()  # V(s_t) and V(s'_t)
    if final_values is not None:
        for (t, i, _), final_value in zip(rollout.finals, final_values):
            next_v[t, i] = final_value
    adv_np, ret_np = compute_gae(
        rollout.rew,
        v,
        next_v,
        rollout.term,
        rollout.trunc,
        args.gamma,
        args.gae_lambda,
        args.bootstrap_truncation,
    )
    var_ret = ret_np.var()
    explained_var = math.nan if var_ret == 0 else 1.0 - (ret_np - v).var() / var_ret
    return b_obs, adv_np, ret_np, explained_var


# --- PPO update -----------------------------------------------------------------------------------


class Minibatch(NamedTuple):
    """A minibatch's columns, views of the rows of the update's one buffer
    ``[obs | actions | log p | -A | R]`` (no copies), in the order the PPO losses take them."""

    obs: Tensor
    actions: Tensor
    logprobs: Tensor
    """Log-probabilities of the actions under the policy that acted."""
    neg_advantages: Tensor
    """Minus the (normalised) advantages: the loss's sign."""
    returns: Tensor

    @classmethod
    def of(cls, rows: Tensor, obs_dim: int, act_dim: int) -> Minibatch:
        actions_end = obs_dim + act_dim
        return cls(
            rows[:, :obs_dim], rows[:, obs_dim:actions_end], *rows[:, actions_end:].unbind(1)
        )


def ppo_update(
    args: Args,
    agent: Agent,
    adam_step: AdamStep,
    rollout: Rollout,
    b_obs: Tensor,
    adv_np: np.ndarray,
    ret_np: np.ndarray,
    generators: dict[str, torch.Generator],
) -> tuple[Tensor, Tensor, Tensor, float]:
    """``update_epochs`` passes of ``num_minibatches`` minibatch steps over the rollout: the
    hand-written loss gradient (:func:`ppo_loss_and_grads`), Adam, Shrink & Perturb's noise,
    then CBP/ReDo on the minibatch's hidden activations.

    :return: the device tensors ``[losses (pg, v) per minibatch, log-ratios per minibatch]``,
        the last minibatch's gradient norm of each network (before clipping) and the seconds
        spent in S&P and CBP/ReDo."""
    B, act_dim = b_obs.shape[0], rollout.act.shape[2]
    device = b_obs.device
    minibatch_size = B // args.num_minibatches
    b_adv = torch.from_numpy(adv_np.reshape(B).astype(np.float32)).to(device)
    if args.norm_adv:
        b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
    b_ret = torch.from_numpy(ret_np.reshape(B).astype(np.float32)).to(device)
    log_std = agent.log_std
    with torch.no_grad():
        b_logp = -0.5 * rollout.noise.reshape(B, act_dim).square().sum(1) - log_std.sum()
        b_logp -= 0.5 * act_dim * LOG_2PI
    b_act = rollout.act_host.to(device).reshape(B, act_dim)
    # One tensor, so that each minibatch is one slice (:class:`Minibatch` names its columns);
    # the advantage is negated (the loss uses -A).
    data = torch.cat([b_obs, b_act, b_logp[:, None], -b_adv[:, None], b_ret[:, None]], 1)
    obs_dim = b_obs.shape[1]
    autograd, churn = agent.autograd, agent.churn
    if not autograd:
        actor = [m for m in agent.actor if isinstance(m, nn.Linear)]
        critic = [m for m in agent.critic if isinstance(m, nn.Linear)]
    taps = [hidden_taps(agent.actor), hidden_taps(agent.critic)] if autograd else [None, None]
    params = agent.params
    # Per-minibatch losses and log-ratios stay on the device until the update ends.
    num_mb = args.update_epochs * args.num_minibatches
    losses = torch.zeros(num_mb, 2, device=device)
    log_ratios = torch.zeros(num_mb, minibatch_size, device=device)
    cbp_time = 0.0
    norm_groups = [list(agent.actor.parameters()), list(agent.critic.parameters())]
    grad_norms = torch.zeros(2, dtype=torch.float64, device=device)
    k = 0
    with torch.no_grad():
        for _ in range(args.update_epochs):
            # One gather per epoch; each minibatch is then a contiguous slice.
            shuffled = data[torch.randperm(B, generator=generators["main"], device=device)]
            reference = None if churn is None else churn.reference_permutation(B)
            for start in range(0, B, minibatch_size):
                batch = Minibatch.of(shuffled[start : start + minibatch_size], obs_dim, act_dim)
                if autograd:
                    extra = None
                    if churn is not None:
                        states = b_obs[reference[start : start + minibatch_size]]
                        extra = functools.partial(churn.loss, states)
                    pg_loss, v_loss, log_ratio, actor_hidden, critic_hidden = ppo_loss_autograd(
                        agent.actor,
                        agent.critic,
                        log_std,
                        *batch,
                        args.clip_coef,
                        args.vf_coef,
                        args.ent_coef,
                        extra_loss=extra,
                        actor_taps=taps[0],
                        critic_taps=taps[1],
                    )
                else:
                    pg_loss, v_loss, log_ratio, actor_hidden, critic_hidden = ppo_loss_and_grads(
                        actor,
                        critic,
                        log_std,
                        *batch,
                        args.clip_coef,
                        args.vf_coef,
                        args.ent_coef,
                    )
                agent.methods.after_backward()
                if k == num_mb - 1:  # the last minibatch's, before clipping
                    grad_norms = torch.stack([gradient_norm(p) for p in norm_groups])
                if args.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                adam_step()
                t_cbp = time.perf_counter()
                agent.methods.after_step(actor_hidden, critic_hidden)
                cbp_time += time.perf_counter() - t_cbp
                losses[k, 0] = pg_loss
                losses[k, 1] = v_loss
                log_ratios[k] = log_ratio
                k += 1
    if churn is not None:
        churn.end_update(pg_loss, scale=agent.optimizer.param_groups[0]["lr"] / args.learning_rate)
    return losses, log_ratios, grad_norms, cbp_time


# --- main: the algorithm's outline ----------------------------------------------------------------


def main(args: Args, given: set[str] | None = None) -> ppo_run.TrainResult:
    """Train PPO as configured by ``args``; see the module docstring.

    ``given``: the fields set on the command line (:func:`ppo_settings.given_fields`), which a resumed run's
    settings must agree with; None counts the fields that differ from their defaults.

    :raises UsageError: for bad settings, before anything is created or written.
    :raises NonFiniteLossError: after checkpointing the last good state, if a loss is NaN/Inf.
    """
    t_begin = time.perf_counter()
    # Every check comes before anything is created.
    given_args, args, ckpt, run_dir = ppo_settings.run_settings(args, given)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    caller_threads = torch.get_num_threads()

    # TRY NOT TO MODIFY: seeding
    generators, seeds = ppo_run.seed_everything(args.seed, device)

    # env setup
    envs = vector_env.make([make_env(args, i) for i in range(args.num_envs)])
    writer = None
    try:
        torch.set_num_threads(args.threads)  # restored when the run ends
        obs_space, act_space = envs.single_observation_space, envs.single_action_space
        if not isinstance(act_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise UsageError(f"{args.env}: need a flat Box observation and a Box action space")
        obs_dim, act_dim = int(obs_space.shape[0]), int(act_space.shape[0])
        B = args.num_envs * args.num_steps
        num_updates = -(-args.steps // B)

        agent = make_agent(args, obs_dim, act_dim, device, seeds, generators["perturb"])
        trackers = [WeightChangeTracker(net) for _, net in agent.sequential_networks()]
        state = ppo_run.start_state(args, obs_dim, device, envs, agent, generators, ckpt)
        writer = ppo_run.open_outputs(run_dir, args, state, resumed=ckpt is not None)

        # ALGO Logic: Storage setup
        rollout = Rollout(args, obs_dim, act_dim, agent)
        adam_step = AdamStep(agent.optimizer)
        timings = dict.fromkeys(("env", "acting", "update", "cbp", "metrics", "checkpoint"), 0.0)
        t_start = time.perf_counter()
        checkpoints = ppo_run.Checkpoints(
            given_args, args, agent, state, envs, generators, run_dir, writer, timings
        )
        steps_before = state.global_step
        bar = ppo_run.progress_bar(args, state)
        segments = Segments(args, envs, agent, state, writer)
        with run_folder.StopSignal() as stop:
            while state.global_step < args.steps and stop.signum is None:
                state.update += 1
                t_iter = time.perf_counter()
                # Annealing the rate if instructed to do so.
                if args.anneal_lr:
                    frac = 1.0 - (state.update - 1.0) / num_updates
                    agent.optimizer.param_groups[0]["lr"] = frac * args.learning_rate
                lr = agent.optimizer.param_groups[0]["lr"]

                # A new segment of env 0 is a task boundary for the plasticity methods; evaluations.
                t_iter += segments.update_start()  # the evaluations' time is not training's

                # ALGO LOGIC: action logic; TRY NOT TO MODIFY: execute the game and log data.
                collect_rollout(args, envs, agent, state, rollout, generators["main"])
                t_rollout = time.perf_counter()
                timings["env"] += rollout.env_time
                timings["acting"] += t_rollout - t_iter - rollout.env_time

                # bootstrap value if not done
                b_obs, adv_np, ret_np, explained_var = rollout_targets(args, agent, state, rollout)
                if args.metrics_every and state.update == 1:  # update 0: the networks as built
                    for key, v in initial_plasticity_scalars(agent, b_obs).items():
                        writer.add_scalar(key, v, 0)

                # Optimizing the policy and value network
                for tr in trackers:
                    tr.snapshot()
                log_metrics = args.metrics_every and state.update % args.metrics_every == 0
                if log_metrics:  # the policy before the update, for its churn
                    with torch.no_grad():
                        policy_before = (agent.actor(b_obs), agent.log_std.detach().clone())
                losses, log_ratios, grad_norms, cbp_time = ppo_update(
                    args, agent, adam_step, rollout, b_obs, adv_np, ret_np, generators
                )
                changes = torch.stack([tr.change() for tr in trackers])
                state.max_change = torch.maximum(state.max_change, changes)
                *stats, finite = update_statistics(args, agent.log_std, losses, log_ratios, changes)
                t_update = time.perf_counter()
                timings["update"] += t_update - t_rollout
                timings["cbp"] += cbp_time
                if not finite:
                    raise NonFiniteLossError(checkpoints.save_last_good(B))

                # TRY NOT TO MODIFY: record rewards for plotting purposes
                scalars = update_scalars(
                    args, envs, stats, explained_var, lr, B / (t_update - t_iter)
                )
                if log_metrics:
                    t_m = time.perf_counter()
                    scalars.update(
                        plasticity_scalars(agent, state, b_obs, grad_norms, policy_before)
                    )
                    timings["metrics"] += time.perf_counter() - t_m
                timings["total"] = time.perf_counter() - t_start
                write_scalars(writer, bar, rollout, state, scalars, timings)
                checkpoints.update_done(stopping=stop.signum is not None)
            bar.close()
            if stop.signum is not None:
                checkpoints.stopped(stop.signum)
        timings["total"] = time.perf_counter() - t_start
        result = ppo_run.train_result(run_dir, state, agent, stop.signum, timings)
        seconds = time.perf_counter() - t_begin
        print(
            ppo_run.closing_summary(result, args.steps, state.global_step - steps_before, seconds)
        )
        return result
    finally:
        if writer is not None:
            writer.close()
        envs.close()
        torch.set_num_threads(caller_threads)
        run_folder.discard_if_empty(run_dir)  # a new run that stopped before writing anything


def cli() -> None:
    """Command-line entry point: one line and exit code 2 for bad settings."""
    try:
        args = cli_parse(Args, sys.argv[1:], Args.__doc__)
        result = main(args, ppo_settings.given_fields(Args, sys.argv[1:]))
    except UsageError as e:
        sys.exit(report_error(e))
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if result.interrupted_by is not None:
        sys.exit(128 + result.interrupted_by)


if __name__ == "__main__":
    cli()
