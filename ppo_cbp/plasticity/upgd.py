"""UPGD: utility-based perturbed gradient descent (Elsayed and Mahmood, "Addressing Loss of
Plasticity and Catastrophic Forgetting in Continual Learning", ICLR 2024; code:
github.com/mohmdelsayed/upgd).

- :class:`UPGD`: ``core/optim/weight_upgd/first_order.py``, ``FirstOrderGlobalUPGD``, the
  first-order, globally scaled variant with weight decay ("UPGD-W"), the supervised benchmarks'
  rule.
- :class:`AdaptiveUPGD`: ``core/run/rl/adaupgd.py``, the Adam-style variant the authors ran
  PPO with (``core/run/rl/ppo_continuous_action_upgd.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppo_cbp.nets import kernels
from ppo_cbp.plasticity.seeded import SeededOptimizer
from ppo_cbp.seeding import TAG_UPGD

__all__ = ["UPGD", "AdaptiveUPGD"]

KERNEL_EXP_MAX = 4096
"""The most elements per seed of a parameter whose sigmoid :class:`UPGD`'s CPU kernel takes
itself (saving two calls); on larger ones torch's vectorised sigmoid is faster than the
kernel's scalar ``exp`` (Permuted MNIST's 784 x 100 weight: 3.1 ms a step against 2.1)."""


def _upgd_defaults(lr: float, weight_decay: float, beta_utility: float, sigma: float) -> dict:
    """The settings both UPGD optimizers share, checked."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0.0 <= beta_utility < 1.0:
        raise ValueError(f"beta_utility must be in [0, 1), got {beta_utility}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma)


class _SeededPerturbation(SeededOptimizer):
    """The UPGD optimizers' shared parts: stacked seeds (``seed_dims``), one noise generator per
    seed (stream :data:`~ppo_cbp.seeding.TAG_UPGD`), the per-seed maximum of the utility traces
    and a ``state_dict`` that carries the generators' states."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        seed_dims: int,
        seeds: Sequence[int],
    ):
        super().__init__(params, defaults, seed_dims, seeds, TAG_UPGD)
        self._buffers: dict[int, tuple[Tensor, ...]] = {}
        # the noise buffers and, per generator, the rows each draws into
        self._draws: tuple[list[Tensor], list[list[Tensor]]] = ([], [])
        self._kernel_rows: tuple[list, list] = ([], [])

    def _per_seed_max(self, u: Tensor) -> Tensor:
        """``max u`` of one parameter: ``[S]`` when stacked, else 0-dim."""
        if not self.seed_dims:
            return u.max()
        return u.reshape(u.shape[0], -1).amax(1)

    def _broadcast(self, top: Tensor, p: Tensor) -> Tensor:
        """The global maximum (``[S]`` or 0-dim) shaped to divide ``p``'s trace; a maximum of
        exactly 0 (no utility anywhere) becomes 1 instead of giving 0/0."""
        return self._shaped(_nonzero(top), p)

    def _shaped(self, top: Tensor, p: Tensor) -> Tensor:
        """A per-seed ``[S]`` value (or 0-dim) as a view that broadcasts against ``p``."""
        return top.view(-1, *([1] * (p.dim() - 1))) if self.seed_dims else top

    def _noise(self, params: list[Tensor]) -> list[Tensor]:
        """Standard normal draws shaped like ``params``: seed by seed, parameter by parameter
        (into :meth:`_scratch` buffers)."""
        noise = self._noise_buffers(params)
        for g, row in zip(self.generators, self._draws[1]):
            for n in row:
                n.normal_(generator=g)
        return noise

    def _noise_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """The buffers that :meth:`_noise` draws into."""
        noise, rows = self._draws
        if len(noise) != len(params) or any(
            n.shape != p.shape or n.dtype != p.dtype for n, p in zip(noise, params)
        ):
            noise = self._scratch(params, 0)
            rows = [[n[s] for n in noise] for s in range(len(self.generators))]
            self._draws = noise, (rows if self.seed_dims else [noise])
        return noise

    def _scratch(self, params: list[Tensor], slot: int) -> list[Tensor]:
        """Contiguous buffers shaped like ``params``, two per parameter, kept from step to
        step: a fresh allocation of a large tensor at every step costs more than a pass over
        it (the pages are mapped anew)."""
        if len(self._buffers) > sum(len(g["params"]) for g in self.param_groups):
            live = {id(p) for g in self.param_groups for p in g["params"]}  # (an injection's
            self._buffers = {k: v for k, v in self._buffers.items() if k in live}  # left)
        out = []
        for p in params:
            buffers = self._buffers.get(id(p))
            if buffers is None or buffers[0].shape != p.shape or buffers[0].dtype != p.dtype:
                buffers = self._buffers[id(p)] = tuple(
                    torch.empty(p.shape, dtype=p.dtype, device=p.device) for _ in range(2)
                )
            out.append(buffers[slot])
        return out


def _nonzero(top: Tensor) -> Tensor:
    """``top`` with its entries of exactly 0 (no utility anywhere) replaced by 1, so that
    dividing by it gives 0 instead of 0/0."""
    return torch.where(top == 0, torch.ones_like(top), top)


class UPGD(_SeededPerturbation):
    """First-order global UPGD with weight decay (the authors' ``FirstOrderGlobalUPGD``).

    For every weight ``theta`` with gradient ``g``, at step ``t``:

        u     <- beta_u * u + (1 - beta_u) * (-g * theta)           (utility trace, first order)
        u_hat  = u / (1 - beta_u^t)
        s      = sigmoid(u_hat / max u)                              (max over all weights)
        theta <- (1 - lr * wd) * theta - lr * (g + sigma * xi) * (1 - s),   xi ~ N(0, 1)

    ``max u`` is the largest (not bias-corrected) trace entry over every parameter after this
    step's update of the traces, as in the authors' code; weights of high utility are
    protected from both the gradient and the perturbation, the others are perturbed, which
    keeps plasticity. Unlike the code, ``max u`` never leaves the device (no host sync), and a
    maximum of exactly 0 (no gradient anywhere) divides by 1 instead of giving 0/0.

    Stacked seeds (``seed_dims=1``): every parameter is ``[S, ...]``; ``max u`` is taken per
    seed over dims 1.., and seed ``s``'s noise is drawn from its own generator (stream
    :data:`~ppo_cbp.seeding.TAG_UPGD` of ``seeds[s]``), parameter by parameter in the order of the groups, so a
    stack of S seeds follows each seed's run alone.

    :param params: parameters or groups (every parameter needs a gradient at each step).
    :param lr: step size (the code's default 1e-5; the benchmarks set their own).
    :param weight_decay: ``wd`` (default 0, the constructor's in ``first_order.py``, and the
        MLP benchmarks' default; the repository README's stand-alone UPGD has 1e-3, and a step
        of ``2 * lr``; the authors' chosen ``FirstOrderGlobalUPGD`` settings,
        ``experiments/statistics_*.py``, use 0 on the label-permuted tasks and 0.01 on
        input-permuted MNIST).
    :param beta_utility: ``beta_u`` in [0, 1) (default 0, the constructor's: the instantaneous
        utility; the README's 0.999, the benchmarks' default).
    :param sigma: the perturbation's standard deviation (default 1, the constructor's; the
        README's 1e-3, the benchmarks' default).
    :param seed_dims: 0, or 1 for stacked parameters.
    :param seeds: one run seed per stacked network (one when ``seed_dims=0``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        beta_utility: float = 0.0,
        sigma: float = 1.0,
        *,
        seed_dims: int = 0,
        seeds: Sequence[int] = (0,),
    ):
        defaults = _upgd_defaults(lr, weight_decay, beta_utility, sigma)
        super().__init__(params, defaults, seed_dims, seeds)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("UPGD.step takes no closure")
        params = [p for g in self.param_groups for p in g["params"]]
        if any(p.grad is None for p in params):  # before any state changes
            raise ValueError("UPGD needs a gradient for every parameter")
        if params and self._kernel_step(params):
            return
        # each operation over every parameter of a group at once (torch._foreach_*): at batch 1
        # the step is a few dozen small tensors, where per-tensor calls cost more than the math
        maxima = []
        for group in self.param_groups:
            ps = group["params"]
            for p in ps:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["avg_utility"] = torch.zeros_like(p)
                state["step"] += 1
            beta = group["beta_utility"]
            traces = [self.state[p]["avg_utility"] for p in ps]
            torch._foreach_mul_(traces, beta)
            # (addcmul_ would fuse the multiply-add in its vectorised body only: a seed's slice
            # of a stack would then differ from the seed alone)
            grad_times_p = self._scratch(ps, 1)
            torch._foreach_copy_(grad_times_p, [p.grad for p in ps])
            torch._foreach_mul_(grad_times_p, ps)
            torch._foreach_add_(traces, grad_times_p, alpha=-(1.0 - beta))
            maxima += [self._per_seed_max(u) for u in traces]
        if not maxima:
            return
        top = _nonzero(torch.stack(maxima).amax(0))
        noise = self._noise(params)
        i = 0
        for group in self.param_groups:
            ps = group["params"]
            lr, wd, sigma = group["lr"], group["weight_decay"], group["sigma"]
            # u_hat / max u as u times 1 / (correction * max u), a per-seed scalar: one
            # multiplication instead of two divisions (the slowest passes at width 2,000).
            # 1 - s as the authors compute it: sigmoid(-u_hat / max u) would be more accurate
            # near s = 1, but its denormal results there slow every later pass
            corrections = [1.0 - group["beta_utility"] ** self.state[p]["step"] for p in ps]
            factors = {c: (top * c).reciprocal_() for c in set(corrections)}
            keep = self._scratch(ps, 1)
            torch._foreach_copy_(keep, [self.state[p]["avg_utility"] for p in ps])
            torch._foreach_mul_(
                keep, [self._shaped(factors[c], p) for c, p in zip(corrections, ps)]
            )
            torch._foreach_sigmoid_(keep)
            torch._foreach_neg_(keep)
            torch._foreach_add_(keep, 1.0)
            steps = noise[i : i + len(ps)]  # contiguous, unlike the layers' weight views
            torch._foreach_mul_(steps, sigma)
            torch._foreach_add_(steps, [p.grad for p in ps])
            if wd:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            torch._foreach_mul_(steps, keep)
            torch._foreach_add_(ps, steps, alpha=-lr)
            i += len(ps)

    def _kernel_step(self, params: list[Tensor]) -> bool:
        """The step on CPU: two kernel passes per parameter (:func:`~ppo_cbp.nets.kernels.
        upgd_trace_`, :func:`~ppo_cbp.nets.kernels.upgd_apply_`), the same arithmetic as the
        tensor operations below without their dozen calls per group. Whether it stepped (see
        :meth:`_rows_of` for where it does not)."""
        rows = self._rows_of(params)
        if rows is None:
            return False
        top = np.full(rows[0][0].shape[0], -np.inf, dtype=rows[0][0].dtype)
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["step"] += 1
                param, grad, trace = rows[i][:3]
                kernels.upgd_trace_(trace, grad, param, group["beta_utility"], top)
                i += 1
        top[top == 0] = 1  # no utility anywhere: divide by 1 instead of 0/0
        for g, row in zip(self.generators, self._draws[1]):
            for n in row:
                n.normal_(generator=g)
        i = 0
        for group in self.param_groups:
            settings = dict(
                lr=group["lr"], weight_decay=group["weight_decay"], sigma=group["sigma"]
            )
            factors: dict[float, np.ndarray] = {}
            for p in group["params"]:
                correction = 1.0 - group["beta_utility"] ** self.state[p]["step"]
                factor = factors.get(correction)
                if factor is None:
                    factor = factors[correction] = np.reciprocal(top * top.dtype.type(correction))
                param, grad, trace, noise, *given = rows[i]
                if given:  # s = sigmoid(u factor) by torch, as the tensor path takes it
                    (s, s_rows), u = given[0], self.state[p]["avg_utility"]
                    torch.mul(u, self._shaped(torch.from_numpy(factor), p), out=s).sigmoid_()
                    kernels.upgd_apply_given_(param, grad, s_rows, noise, **settings)
                else:
                    kernels.upgd_apply_(param, grad, trace, noise, factor, **settings)
                i += 1
        return True

    def _rows_of(self, params: list[Tensor]) -> list[tuple[np.ndarray, ...]] | None:
        """The kernels' ``[S, R, C]`` views (``S`` 1 without seeds) of each parameter, its
        gradient, its trace and its noise buffer, kept while those tensors stay the same; None
        off the CPU, with mixed dtypes, or when one has no such view (a strided tensor of three
        or more dimensions per seed); a parameter of more than :data:`KERNEL_EXP_MAX` elements
        per seed also has its buffer for ``s`` and that buffer's view."""
        key, rows = self._kernel_rows
        if len(key) == len(params) and all(
            p is q and p.grad is g and self.state[p].get("avg_utility") is u
            for p, (q, g, u) in zip(params, key)
        ):
            return rows
        grads = [p.grad for p in params]
        if not kernels.available(*params, *grads) or len({p.dtype for p in params}) > 1:
            self._kernel_rows = (
                [(p, p.grad, self.state[p].get("avg_utility")) for p in params],
                None,
            )
            return None
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["avg_utility"] = torch.zeros_like(p)
        traces = [self.state[p]["avg_utility"] for p in params]
        noise = self._noise_buffers(params)
        views = [
            tuple(_three_dims(t, self.seed_dims) for t in x)
            for x in zip(params, grads, traces, noise)
        ]
        if any(v is None for x in views for v in x):
            return None
        rows = [tuple(kernels.as_array(v) for v in x) for x in views]
        scratch = self._scratch(params, 1)
        for i, (p, v) in enumerate(zip(params, scratch)):
            if p.numel() // (p.shape[0] if self.seed_dims else 1) > KERNEL_EXP_MAX:
                protection = _three_dims(v, self.seed_dims)
                rows[i] = (*rows[i], (v, kernels.as_array(protection)))
        self._kernel_rows = (list(zip(params, grads, traces)), rows)
        return rows


def _three_dims(t: Tensor, seed_dims: int) -> Tensor | None:
    """``t`` as a ``[S, R, C]`` view (a seed's tensor as rows and columns; ``S`` 1 without
    seeds), or None when its strides allow none."""
    x = t.detach() if seed_dims else t.detach().unsqueeze(0)
    if x.dim() < 3:
        return x.reshape(x.shape[0], -1, 1)  # a view: at most one dimension per seed
    try:
        return x.view(x.shape[0], -1, x.shape[-1])
    except RuntimeError:
        return None


class AdaptiveUPGD(_SeededPerturbation):
    """Adam-style UPGD, the authors' optimizer for PPO (``AdaptiveUPGD`` of
    ``core/run/rl/adaupgd.py``, run by ``core/run/rl/ppo_continuous_action_upgd.py``); the
    supervised benchmarks keep the first-order rule of :class:`UPGD`.

    For every weight ``theta`` with gradient ``g``, at step ``t``:

        u     <- beta_u * u + (1 - beta_u) * (-g * theta)            (utility trace, first order)
        m     <- beta_1 * m + (1 - beta_1) * g
        v     <- beta_2 * v + (1 - beta_2) * g^2
        u_hat  = u / (1 - beta_u^t),  m_hat = m / (1 - beta_1^t),  v_hat = v / (1 - beta_2^t)
        s      = sigmoid(u_hat / max u)                               (max over all weights)
        theta <- (1 - lr * wd) * theta
                 - 2 * lr * (m_hat * (1 - s) / (sqrt(v_hat) + eps) + sigma * xi * (1 - s)),
                 xi ~ N(0, 1)

    in the code's order of operations: ``m_hat * (1 - s)`` is divided by ``sqrt(v_hat) + eps``,
    the noise ``xi * sigma`` is multiplied by ``1 - s`` (it is not divided by the second
    moment), and the sum is added to the decayed weights with ``alpha = -2 * lr`` (the decay
    uses ``lr``, the step twice ``lr``). ``max u`` is the largest (not bias-corrected) trace
    entry over every parameter after this step's update of the traces. As in :class:`UPGD`,
    ``max u`` never leaves the device (no host sync), and a maximum of exactly 0 divides by 1
    instead of giving 0/0 (the code's NaN).

    Stacked seeds (``seed_dims=1``): every parameter is ``[S, ...]``; ``max u`` is taken per
    seed over dims 1.., and seed ``s``'s noise is drawn from its own generator (stream
    :data:`~ppo_cbp.seeding.TAG_UPGD` of ``seeds[s]``), parameter by parameter in the order of
    the groups, so a stack of S seeds follows each seed's run alone. The code draws one
    ``randn_like`` per parameter in the same order from the global generator.

    Every parameter needs a gradient at each step: the code reads ``p.grad`` of every parameter
    (a missing one fails there); here a missing gradient raises ``ValueError`` before any state
    or weight changes.

    :param params: parameters or groups.
    :param lr: step size (default 3e-4, ``learning_rate`` of
        ``ppo_continuous_action_upgd.py``; ``adaupgd.py``'s constructor has 1e-5). The script
        anneals it linearly to 0 (``anneal_lr``).
    :param weight_decay: ``wd`` (default 1e-3, ``weight_decay`` of
        ``ppo_continuous_action_upgd.py`` and ``adaupgd.py``'s constructor).
    :param beta_utility: ``beta_u`` in [0, 1) (default 0.999, ``beta_utility`` of
        ``ppo_continuous_action_upgd.py`` and ``adaupgd.py``'s constructor).
    :param sigma: the perturbation's standard deviation (default 1e-3, ``sigma`` of
        ``ppo_continuous_action_upgd.py`` and ``adaupgd.py``'s constructor).
    :param betas: ``(beta_1, beta_2)`` in [0, 1) (default (0.9, 0.999), ``adaupgd.py``'s
        constructor's ``beta1``, ``beta2``; ``ppo_continuous_action_upgd.py`` leaves them).
    :param eps: ``eps`` (default 1e-5, passed by ``ppo_continuous_action_upgd.py``, as
        CleanRL's PPO passes it to Adam; also ``adaupgd.py``'s constructor's).
    :param seed_dims: 0, or 1 for stacked parameters.
    :param seeds: one run seed per stacked network (one when ``seed_dims=0``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        weight_decay: float = 1e-3,
        beta_utility: float = 0.999,
        sigma: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-5,
        *,
        seed_dims: int = 0,
        seeds: Sequence[int] = (0,),
    ):
        defaults = _upgd_defaults(lr, weight_decay, beta_utility, sigma)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        defaults.update(betas=tuple(betas), eps=eps)
        super().__init__(params, defaults, seed_dims, seeds)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("AdaptiveUPGD.step takes no closure")
        params = [p for g in self.param_groups for p in g["params"]]
        if any(p.grad is None for p in params):
            raise ValueError("AdaptiveUPGD needs a gradient for every parameter")
        global_max: Tensor | None = None
        for group in self.param_groups:
            beta = group["beta_utility"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["avg_utility"] = torch.zeros_like(p)
                    state["first_moment"] = torch.zeros_like(p)
                    state["sec_moment"] = torch.zeros_like(p)
                state["step"] += 1
                u = state["avg_utility"]
                u.mul_(beta).add_(p.grad * p, alpha=-(1.0 - beta))
                state["first_moment"].mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                state["sec_moment"].mul_(beta2).add_(p.grad.square(), alpha=1.0 - beta2)
                m = self._per_seed_max(u)
                global_max = m if global_max is None else torch.maximum(global_max, m)
        if global_max is None:
            return
        noise = self._noise(params)
        i = 0
        for group in self.param_groups:
            lr, wd, sigma, eps = group["lr"], group["weight_decay"], group["sigma"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                t = state["step"]
                top = self._broadcast(global_max, p)
                u_hat = state["avg_utility"] / (1.0 - group["beta_utility"] ** t)
                keep = 1.0 - torch.sigmoid_(u_hat.div_(top))  # 1 - s
                denom = (state["sec_moment"] / (1.0 - beta2**t)).sqrt_().add_(eps)
                update = (state["first_moment"] / (1.0 - beta1**t)).mul_(keep).div_(denom)
                update.add_(noise[i].mul_(sigma).mul_(keep))
                p.mul_(1.0 - lr * wd).add_(update, alpha=-2.0 * lr)
                i += 1
