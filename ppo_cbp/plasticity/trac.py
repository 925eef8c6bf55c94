"""TRAC, a parameter-free scaling of a base optimizer's updates for lifelong learning
(Muppidi, Zhang and Yang, "Fast TRAC: A Parameter-Free Optimizer for Lifelong
Reinforcement Learning", NeurIPS 2024).

We follow the authors' package (``trac-optimizer`` 0.0.2, ``trac_optimizer/trac.py``) step for
step but do not use it: its inner product and scale are global over all parameters (so S
stacked seeds would share one scale), it keeps its state under a string key of
``optimizer.state`` (which ``state_dict`` cannot save), synchronises with the host three times
a step (NaN checks, ``max(s, 0)``) and appends to a log file at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.nets import kernels

__all__ = ["TRAC", "erfi", "erfi_series"]

BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)
"""The authors' discount factors, one scale tuner each."""
ERFI_MAX = 26.0
"""erfi is evaluated on [-26, 26] (beyond it overflows float64: erfi(26.6) ~ 1e306)."""
_ERFI_TERMS = 900


def erfi(x: Tensor) -> Tensor:
    """The imaginary error function ``erfi(x) = 2 / sqrt(pi) sum_n x^(2n+1) / (n! (2n+1))`` of
    real ``x`` (clamped to +-:data:`ERFI_MAX`), in float64. On CPU the series is summed term by
    term until it has converged (:func:`~ppo_cbp.nets.kernels.erfi_`); elsewhere by
    :func:`erfi_series`, without a host synchronisation."""
    z = x.to(torch.float64)
    if not kernels.available(z):
        return erfi_series(z).to(x.dtype)
    out = torch.empty_like(z)
    kernels.erfi_(z.contiguous().numpy(), out.numpy(), ERFI_MAX)
    return out.to(x.dtype)


def erfi_series(x: Tensor) -> Tensor:
    """:func:`erfi` by a fixed 900 terms of its series, on any device: summed in float64 in log
    space, so that the largest term (near ``n = x^2``) stays finite; the terms are summed
    relative to the largest and those below ``e^-60`` of it are left out (together under
    ``1e-23`` of the sum)."""
    z = x.to(torch.float64).clamp(-ERFI_MAX, ERFI_MAX)
    power, log_coef = _series(x.device)
    log_abs = torch.log(z.abs().clamp_min(1e-300)).unsqueeze(-1)
    log_terms = torch.addcmul(log_coef, power, log_abs)
    # relative to the largest term: the terms below e^-60 of it (far under float64's
    # resolution of the sum) are dropped, so that exp never meets the slow denormal range
    top = log_terms.amax(-1, keepdim=True)
    relative = log_terms.sub_(top)
    terms = torch.exp(relative.clamp_min(-60.0)).masked_fill_(relative < -60.0, 0.0).sum(-1)
    terms = terms * torch.exp(top.squeeze(-1))
    return (torch.sign(z) * terms * (2 / math.sqrt(math.pi))).to(x.dtype)


_SERIES: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _series(device: torch.device) -> tuple[Tensor, Tensor]:
    """The series' powers ``2n + 1`` and log coefficients ``-log(n! (2n + 1))`` (made once per
    device)."""
    cached = _SERIES.get(device)
    if cached is None:
        n = torch.arange(_ERFI_TERMS, dtype=torch.float64, device=device)
        cached = _SERIES[device] = (2 * n + 1, -torch.lgamma(n + 1) - torch.log(2 * n + 1))
    return cached


class TRAC(torch.optim.Optimizer):
    """TRAC around a base optimizer (Muppidi et al. 2024; the authors' ``start_trac``).

    With ``theta_ref`` the parameters before the first step, ``S_t = sum_j s_j`` the sum of the
    tuners' scales and ``theta_t`` the parameters the network uses, each step (per seed):

        Delta_t = (theta_t - theta_ref) / (S_t + eps)          (the base's own iterate, unscaled)
        u_t     = the base optimizer's update at theta_t, with the gradients g_t
        h_t     = <Delta_t, g_t>                                (over all parameters of a seed)
        v_j    <- beta_j^2 v_j + h_t^2,    sigma_j <- beta_j sigma_j - h_t
        s_j     = s_prior / erfi(1 / sqrt 2) * erfi(sigma_j / (sqrt 2 sqrt(v_j) + eps))
        theta_{t+1} = theta_ref + (Delta_t + u_t) * max(sum_j s_j, 0)

    starting from ``s = v = 0`` and ``sigma = 1e-8``: the first updates are scaled to near
    ``theta_ref``, and the scale grows while the gradients keep agreeing with the direction
    travelled. Defaults are the authors': ``betas`` :data:`BETAS`, ``s_prior = 1e-8``,
    ``eps = 1e-8``.

    Stacked seeds (``seed_dims=1``): every parameter is ``[S, ...]``; ``h``, ``v``, ``sigma`` and
    ``s`` are ``[S, len(betas)]``, so each seed is scaled as it would be alone.

    The base optimizer is stepped as it is (its own state and hyperparameters; its param groups
    and state are this optimizer's), so code that reads ``optimizer.state[p]`` (CBP's resets)
    or edits ``param_groups`` keeps working. No host synchronisation in :meth:`step`.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        betas: Sequence[float] = BETAS,
        s_prior: float = 1e-8,
        eps: float = 1e-8,
        *,
        seed_dims: int = 0,
    ):
        if not isinstance(base, torch.optim.Optimizer):
            raise ValueError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if not betas or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        if not s_prior > 0 or not eps > 0:
            raise ValueError(f"s_prior and eps must be > 0, got {s_prior}, {eps}")
        if seed_dims not in (0, 1):
            raise ValueError(f"seed_dims must be 0 or 1, got {seed_dims}")
        self.base = base
        self.defaults = base.defaults
        self.param_groups = base.param_groups
        self.state = base.state
        self.seed_dims = seed_dims
        self.s_prior, self.eps = float(s_prior), float(eps)
        first = base.param_groups[0]["params"][0]
        seeds = first.shape[0] if seed_dims else 1
        stats = dict(dtype=torch.float64, device=first.device)
        self.betas = torch.tensor(list(betas), **stats)
        self.s = torch.zeros(seeds, len(betas), **stats)
        self.variance = torch.zeros(seeds, len(betas), **stats)
        self.sigma = torch.full((seeds, len(betas)), 1e-8, **stats)
        self._prior = self.s_prior / erfi(torch.tensor(1.0 / math.sqrt(2.0), **stats))
        self.reference: list[Tensor] = []
        """``theta_ref`` of every parameter, in the order of the groups (set at the first step)."""
        # within a step: theta_t of each parameter (buffers kept across steps), the seeds'
        # S_t + eps and h_t, and the parameters stepped (see _plan)
        self._before: dict[int, Tensor] = {}
        self._total = self._h = self.s.new_zeros(seeds)
        self._steps: tuple[list, list, str | None] = ([], [], None)

    def _expand(self, scale: Tensor, p: Tensor) -> Tensor:
        """A per-seed ``[S]`` value shaped to multiply parameter ``p``."""
        if self.seed_dims:
            return scale.reshape(-1, *([1] * (p.dim() - 1))).to(p.dtype)
        return scale.reshape(()).to(p.dtype)

    @torch.no_grad()
    def step(self, closure: Any = None, *, base_step: Callable[[], None] | None = None) -> None:
        """One step. ``base_step`` steps the base optimizer (default ``base.step``; a trainer
        passes its own way of stepping it). On CPU, a plain SGD base (no momentum) or a plain
        ``torch.optim.Adam`` (once its state exists) is folded into TRAC's last pass over each
        parameter instead of stepped, with torch's arithmetic: ``u_t = (theta_t - lr (g + wd
        theta_t)) - theta_t``, or Adam's moments and step (:func:`~ppo_cbp.nets.kernels.adam_`)."""
        if closure is not None:
            raise ValueError("TRAC.step takes no closure")
        folded = self._begin_step()
        if folded is None:
            (base_step or self.base.step)()
        self._end_step(folded)

    def _begin_step(self) -> str | None:
        """Keeps ``theta_t`` (unless the base is folded) and takes ``h_t`` from the gradients:
        the base folded into :meth:`_end_step` (``"sgd"``, ``"adam"``), or None."""
        every = [p for g in self.param_groups for p in g["params"]]
        if not self.reference:
            self.reference = [p.detach().clone() for p in every]
        self._total = total = self.s.sum(1) + self.eps  # [S]
        self._h = h = torch.zeros_like(total)
        plan, folded = self._plan(every)
        if folded == "adam" and not all(p in self.base.state for p, *_ in plan):
            folded = None  # Adam's first step makes its state
        per_seed = self._per_seed(total)
        for p, ref, before, arrays in plan:
            if arrays is not None:
                keep = folded is None
                kernels.trac_begin_(*arrays, per_seed[p.dtype], h.numpy(), keep=keep)
            else:
                before.copy_(p)
                prod = (p - ref).div_(self._expand(total, p)).mul_(p.grad)
                flat = prod.reshape(prod.shape[0], -1) if self.seed_dims else prod.reshape(1, -1)
                h += flat.sum(1, dtype=torch.float64)
        return folded

    def _end_step(self, folded: str | None) -> None:
        """The tuners' update and ``theta_{t+1} = theta_ref + (Delta_t + u_t) * max(sum_j s_j,
        0)``, after the base's step or with the folded base's."""
        if kernels.available(self.s):  # the tuners in one call, not a dozen small operations
            scale = torch.empty_like(self._h)
            state = (self.variance.numpy(), self.sigma.numpy(), self.s.numpy())
            prior = float(self._prior)
            kernels.trac_tuners_(
                self._h.numpy(),
                self.betas.numpy(),
                *state,
                prior,
                self.eps,
                ERFI_MAX,
                scale.numpy(),
            )
        else:
            h2 = self._h.unsqueeze(1)
            self.variance.mul_(self.betas**2).add_(h2.square())
            self.sigma.mul_(self.betas).sub_(h2)
            self.s.copy_(
                self._prior * erfi(self.sigma / (math.sqrt(2.0) * self.variance.sqrt() + self.eps))
            )
            scale = self.s.sum(1).clamp_min(0.0)
        totals, scales = self._per_seed(self._total), self._per_seed(scale)
        group = self.param_groups[0]
        for p, ref, before, arrays in self._steps[1]:
            if arrays is None:
                total, factor = self._expand(self._total, p), self._expand(scale, p)
                p.copy_(ref + ((before - ref).div_(total) + (p - before)) * factor)
                continue
            p_rows, ref_rows, grad_rows, before_rows = arrays
            per_seed = totals[p.dtype], scales[p.dtype]
            if folded == "sgd":
                sgd = group["lr"], group["weight_decay"]
                kernels.trac_sgd_apply_(p_rows, ref_rows, grad_rows, *per_seed, *sgd)
            elif folded == "adam":
                state = self.base.state[p]
                state["step"] += 1
                moments = self._rows(state["exp_avg"]), self._rows(state["exp_avg_sq"])
                kernels.trac_adam_apply_(
                    p_rows,
                    ref_rows,
                    grad_rows,
                    *moments,
                    *per_seed,
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=int(state["step"]),
                )
            else:
                kernels.trac_apply_(p_rows, ref_rows, before_rows, *per_seed)

    def _plan(self, every: list[Tensor]) -> tuple[list, str | None]:
        """``(theta, theta_ref, the buffer for theta_t, the kernels' [S, N] views of theta,
        theta_ref, the gradient and that buffer, or None for tensor operations)`` of each
        parameter with a gradient, and the base that can be folded into the last pass
        (``"sgd"``: plain SGD, no buffer then; ``"adam"``: plain Adam; every parameter on the
        kernels), or None. Kept while the parameters and their gradient tensors stay the
        same."""
        tensors = [(p, p.grad) for p in every if p.grad is not None]
        key, plan, folded = self._steps
        if len(key) == len(tensors) and all(
            p is q and g is h for (p, g), (q, h) in zip(key, tensors)
        ):
            return plan, folded
        ref_of = {id(p): r for p, r in zip(every, self.reference, strict=True)}
        fused = [
            kernels.available(p, g) and p.is_contiguous() and g.is_contiguous() for p, g in tensors
        ]
        folded = self._foldable() if tensors and all(fused) else None
        plan = []
        for (p, g), by_kernel in zip(tensors, fused):
            ref = ref_of[id(p)]
            before = p if folded == "sgd" else self._before.get(id(p))
            if before is None or before.shape != p.shape or before.dtype != p.dtype:
                before = self._before[id(p)] = torch.empty_like(p.detach())
            each = (p, ref, g, before)
            plan.append((p, ref, before, tuple(map(self._rows, each)) if by_kernel else None))
        self._steps = (tensors, plan, folded)
        return plan, folded

    def _foldable(self) -> str | None:
        """``"sgd"`` or ``"adam"`` when the base is one of them with settings the kernels
        follow (one group; no momentum; no AMSGrad, maximize or other variants), else None."""
        if len(self.param_groups) != 1:
            return None
        group = self.param_groups[0]
        if type(self.base) is torch.optim.SGD:
            plain = not (group["momentum"] or group["nesterov"] or group.get("maximize"))
            return "sgd" if plain else None
        if type(self.base) is torch.optim.Adam:
            flags = ("amsgrad", "maximize", "capturable", "differentiable", "fused")
            variant = any(group.get(k) for k in flags) or group.get("decoupled_weight_decay")
            return None if variant else "adam"
        return None

    def _per_seed(self, value: Tensor) -> dict[torch.dtype, Any]:
        """A per-seed ``[S]`` float64 value as the kernels take it: in each parameter dtype."""
        if value.device.type != "cpu":
            return {}
        dtypes = {p.dtype for p, *_ in self._steps[1]} - {torch.float64}
        return {torch.float64: value.numpy()} | {dt: value.to(dt).numpy() for dt in dtypes}

    def _rows(self, t: Tensor) -> Any:
        """The ``[S, N]`` (``[1, N]`` without seeds) NumPy view that the kernels take."""
        return kernels.as_array(t.detach().reshape(t.shape[0] if self.seed_dims else 1, -1))

    @property
    def scale(self) -> Tensor:
        """``max(sum_j s_j, 0)`` per seed (``[S]``; one entry without seeds)."""
        return self.s.sum(1).clamp_min(0.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "s": self.s.clone(),
            "variance": self.variance.clone(),
            "sigma": self.sigma.clone(),
            "reference": [r.clone() for r in self.reference],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        for key in ("s", "variance", "sigma"):
            getattr(self, key).copy_(state_dict[key])
        self.reference = [r.clone() for r in state_dict["reference"]]
        self._steps = ([], [], None)
