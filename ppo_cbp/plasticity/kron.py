"""PSGD Kron: preconditioned SGD with a Kronecker-factored preconditioner (Li, "Preconditioned
Stochastic Gradient Descent", IEEE TNNLS 2018, and "Stochastic Hessian Fittings with Lie
Groups", 2024), as implemented by ``kron_torch`` (github.com/evanatyourservice/kron_torch, file
``kron_torch/kron.py``; repository commit ``884427c32bc45e8293e20c26c85e4ccc4f68c9d1``, the
file as last changed by ``7a725ea4007ec1d22e4c46347a18f224260116ed``), the optimizer the
plasticity library Plasticine runs as its "Kron" method (github.com/RLE-Foundation/Plasticine,
commit ``aa00b4bb18f7fe298a47e1ce36c32ba55ce064e8``: ``Kron(agent.parameters(),
lr=args.learning_rate)``, every other setting kron_torch's default; the learning rate is
3e-4 in its continual DMC PPO, ``plasticine/ppo_continual_dmc_plasticine.py``, also
kron_torch's default).

Written from those definitions, for stacked seeds and seeded draws; see :class:`Kron`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppo_cbp.nets import kernels
from ppo_cbp.plasticity.seeded import SeededOptimizer
from ppo_cbp.seeding import TAG_KRON

__all__ = ["Kron", "update_probability"]

MEMORY_SAVE_MODES = (None, "smart_one_diag", "one_diag", "all_diag")
"""kron_torch's ``memory_save_mode`` values: which dimensions get a diagonal factor."""

KERNEL_MAX_SIZE = 64
"""The largest dimension of a parameter (one seed's, merged; a matrix or a vector) that
:class:`Kron` steps on the CPU by one kernel call (:func:`~ppo_cbp.nets.kernels.kron_step_`)
instead of tensor operations. Measured (float32, 3 seeds, one core), the step of one such
parameter: at 5 x 20 140 us instead of 670 (with an update of the preconditioner) and 90
instead of 210 (without), mostly the step's fixed cost; at 64 x 64 825 instead of 1,130 and
270 instead of 300; at 100 x 100 the tensor path's BLAS is faster (2,200 against 3,200, 530
against 980)."""


def update_probability(
    n: int,
    max_prob: float = 1.0,
    min_prob: float = 0.03,
    decay: float = 0.001,
    flat_start: float = 500,
) -> Tensor:
    """The probability of a preconditioner update at step ``n`` (0 at the first step), in
    float32 as kron_torch's ``ProbScheduler`` computes it:

        p(n) = clamp(max_prob * exp(-decay * (n - flat_start)), min_prob, max_prob)

    Defaults are ``precond_update_prob_schedule``'s: 1 for the first 500 steps, then an
    exponential decay that reaches 0.03 after about 4,000 steps.

    :return: a 0-dim float32 tensor (on the CPU).
    """
    f32 = dict(dtype=torch.float32)
    prob = torch.tensor(max_prob, **f32) * torch.exp(
        -torch.tensor(decay, **f32) * (torch.tensor(n, **f32) - torch.tensor(flat_start, **f32))
    )
    return prob.clamp(min=torch.tensor(min_prob, **f32), max=torch.tensor(max_prob, **f32))


def _merged_shape(shape: tuple[int, ...], merge_dims: bool) -> tuple[int, ...]:
    """kron_torch's view of a gradient of ``shape`` (one seed's): a tensor of more than two
    dimensions becomes the matrix ``[prod(shape[:-1]), shape[-1]]`` or ``[shape[0],
    prod(shape[1:])]``, whichever has the smaller signed difference ``cols - rows`` (the
    first on a tie: for a conv kernel ``[out, in, kh, kw]`` nearly always ``[out in kh, kw]``,
    so Continual ImageNet's ``64 x 32 x 3 x 3`` kernel gets a 6144-wide triangular factor;
    kron_torch's rule, kept); a scalar becomes ``[1]`` (kron_torch's scalar preconditioner is the same
    as a diagonal one of size 1)."""
    if len(shape) == 0:
        return (1,)
    if len(shape) > 2 and merge_dims:
        shape1 = (math.prod(shape[:-1]), shape[-1])
        shape2 = (shape[0], math.prod(shape[1:]))
        return shape1 if shape1[1] - shape1[0] <= shape2[1] - shape2[0] else shape2
    return tuple(shape)


def _diagonal_dims(
    shape: tuple[int, ...], max_size: float, min_ndim: int, memory_save_mode: str | None
) -> list[bool]:
    """Which dimensions of a (merged) gradient get a diagonal factor (kron_torch's
    ``_init_Q_exprs``): size 1, size above ``max_size_triangular``, fewer than
    ``min_ndim_triangular`` dimensions, or chosen by ``memory_save_mode``."""
    if memory_save_mode is None:
        chosen = [False] * len(shape)
    elif memory_save_mode == "all_diag":
        chosen = [True] * len(shape)
    else:
        largest = max(range(len(shape)), key=lambda i: (shape[i], i))  # argsort's last
        chosen = [False] * len(shape)
        ordered = sorted(shape)
        if memory_save_mode == "one_diag" or (len(shape) > 1 and ordered[-1] > ordered[-2]):
            chosen[largest] = True
    return [
        size == 1 or size > max_size or len(shape) < min_ndim or d for size, d in zip(shape, chosen)
    ]


def _mode(x: Tensor, i: int) -> Tensor:
    """``x`` (``[S, d_0, ..., d_k]``) with dimension ``i`` of each seed's tensor moved last,
    flattened to ``[S, rest, d_i]``."""
    moved = x.movedim(i + 1, -1)
    return moved.reshape(x.shape[0], -1, x.shape[i + 1])


def _unmode(y: Tensor, i: int, like: Tensor) -> Tensor:
    """The inverse of :func:`_mode` (``y`` ``[S, rest, d_i]`` back to ``like``'s layout)."""
    moved_shape = like.movedim(i + 1, -1).shape
    return y.reshape(moved_shape).movedim(-1, i + 1)


def _left(q: Tensor, x: Tensor, i: int, transpose: bool = False) -> Tensor:
    """``Q x`` along dimension ``i`` of each seed's ``x`` (``Q^T x`` with ``transpose``):
    ``y[..a..] = sum_n Q[a, n] x[..n..]``; a diagonal ``q`` (``[S, d]``) scales instead."""
    if q.dim() == 2:
        return x * q.reshape(q.shape[0], *([1] * i), -1, *([1] * (x.dim() - i - 2)))
    m = q if transpose else q.transpose(-1, -2)
    return _unmode(torch.bmm(_mode(x, i), m), i, x)


def _gram(x: Tensor, i: int, diagonal: bool) -> Tensor:
    """kron_torch's ``einsum(exprG, x, x)``: the contraction of ``x`` with itself over every
    dimension but ``i``: ``[S, d, d]`` (``X_(i) X_(i)^T``), or its diagonal ``[S, d]``."""
    m = _mode(x, i)
    if diagonal:
        return (m * m).sum(1)
    return torch.bmm(m.transpose(-1, -2), m)


def _spectral_lower_bound(a: Tensor, max_abs: Tensor) -> Tensor:
    """kron_torch's ``_lb``: a cheap lower bound of the spectral norm of each seed's
    symmetric ``a`` (``[S, d, d]``), with ``max_abs`` (``[S]``) its largest ``|entry|``:
    ``a / max_abs``, its column ``j`` of largest norm, ``x = col^T a``, ``x / ||x||``,
    ``||a x|| * max_abs``."""
    a = a / max_abs[:, None, None]
    col_norms = (a * a).sum(1)  # [S, d]
    j = torch.argmax(col_norms, dim=1)
    x = a.gather(2, j[:, None, None].expand(a.shape[0], a.shape[1], 1)).squeeze(2)
    x = torch.bmm(x.unsqueeze(1), a).squeeze(1)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    x = torch.bmm(a, x.unsqueeze(2)).squeeze(2)
    return torch.linalg.vector_norm(x, dim=1) * max_abs


def _upper_product(a: Tensor, b: Tensor, leaf: int = 128) -> Tensor:
    """``triu(a) b`` for upper triangular ``b`` (``[S, n, n]``), by blocks: the diagonal
    blocks recursively, the upper right one ``a11 b12 + a12 b22``, the lower left 0. About
    ``n^3 / 3`` multiply-adds instead of ``torch.bmm``'s ``n^3``, and ``triu`` only on the
    ``leaf``-sized diagonal blocks."""
    n = a.shape[-1]
    if n <= leaf:
        return torch.bmm(torch.triu(a), b)
    h = n // 2
    out = torch.zeros_like(b)
    out[:, :h, :h] = _upper_product(a[:, :h, :h], b[:, :h, :h], leaf)
    out[:, h:, h:] = _upper_product(a[:, h:, h:], b[:, h:, h:], leaf)
    corner = torch.bmm(torch.triu(a[:, :h, :h]), b[:, :h, h:])
    out[:, :h, h:] = corner.baddbmm_(a[:, :h, h:], b[:, h:, h:])
    return out


def _per_seed(x: Tensor) -> Tensor:
    """``x`` (``[S, ...]``) as ``[S, n]``."""
    return x.reshape(x.shape[0], -1)


def _seed_matrices(t: Tensor, view: tuple[int, ...]) -> np.ndarray | None:
    """A NumPy view ``[S, d0, d1]`` (``view``) of ``t`` (``[S, ...]`` or one seed's), or None
    where ``t``'s strides allow no such view."""
    a = kernels.as_array(t)
    b = a.reshape(view)
    return b if t.is_contiguous() or np.may_share_memory(a, b) else None


def _as_seeds(v: Tensor, like: Tensor) -> Tensor:
    """A per-seed ``[S]`` value shaped to broadcast against ``like`` (``[S, ...]``)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class Kron(SeededOptimizer):
    """PSGD Kron (kron_torch's ``Kron``, see the module docstring), with stacked seeds.

    For each parameter with gradient ``g``, viewed as kron_torch views it (a tensor of more than
    two dimensions merged into a matrix, :func:`_merged_shape`), with one factor ``Q_i`` per
    dimension (upper triangular ``[d_i, d_i]``, initially ``c^(1/k) I``, or diagonal ``[d_i]``
    for the dimensions of :func:`_diagonal_dims`; ``c`` is ``precond_init_scale``, ``k`` the
    number of dimensions), at step ``t`` (``n = t - 1``):

        m      <- b1 m + (1 - b1) g;   G = m / (1 - b1^t)                  (debiased momentum)
        update  = (counter <- counter + 1) >= 1 / p(n)   (then counter <- 0; p: the schedule,
                  :func:`update_probability`; deterministic, as in kron_torch)
        balance = u < 0.01 and update,  u ~ U[0, 1) drawn at every step
        if balance and G has 2+ dims: Q_i <- Q_i * gm / max|Q_i|,  gm = geometric mean of the
                  max|Q_j| (rescales the factors, their Kronecker product unchanged)
        if update:
            V ~ N(0, I) shaped like G;  G <- G + sqrt(eps_f32) * mean|G| * V
            A     = G x_0 Q_0 x_1 Q_1 ...            (Q_i applied along dimension i)
            conjB = V x_0 Q_0^-T x_1 Q_1^-T ...     (Q_i^-1 applied from the right)
            for each i (A and conjB from the old factors):
                T1 = A_(i) A_(i)^T - conjB_(i) conjB_(i)^T,  T2 = A_(i) A_(i)^T + conjB_(i) ..^T
                    (the diagonals only, for a diagonal Q_i)
                diagonal:    Q_i <- Q_i - precond_lr * T1 * Q_i / max(max|T2|, tiny)
                triangular:  Q_i <- Q_i - precond_lr * triu(T1) Q_i / max(lb(T2), tiny)
                    (lb: :func:`_spectral_lower_bound`; 0 when T2 = 0)
        U = G x_0 (Q_0^T Q_0) x_1 (Q_1^T Q_1) ...  (with G the noised one after an update,
            as in kron_torch, whose in-place noise reaches the preconditioned gradient)
        U <- U * min(1, 1.1 / (rms(U) + 1e-12))                (update RMS clipped at 1.1)
        U <- U + wd * theta   (parameters of two or more dimensions only)
        theta <- theta - lr * U

    On the CPU, a float32 or float64 parameter whose seeds are matrices (merged) or vectors
    of at most :data:`KERNEL_MAX_SIZE` rows and columns is stepped by one kernel call for all
    its seeds (:func:`~ppo_cbp.nets.kernels.kron_step_`): the same arithmetic, in the tensor
    operations' order up to rounding, and the same draws, without hundreds of small calls.

    The factors' cost per step, for a weight ``[out, in]`` with both factors triangular: the
    preconditioned gradient, four products, ``2 out in (out + in)`` multiply-adds; a
    preconditioner update (every step for the first 500 steps, then about every 34th once
    ``p`` is 0.03) adds two triangular solves (``out in (out + in) / 2`` each), four
    ``A A^T``-type products (``out in (out + in)`` in all, twice), ``A = Q_0 G Q_1^T``
    (``out in (out + in)``) and ``triu(T1) Q`` (``out^3 + in^3``, halved by the triangle):
    ``O(out^3 + in^3 + out in (out + in))``, against SGD's ``out in``. A 2000-wide layer thus
    costs ~10^10 multiply-adds per update; ``max_size_triangular`` below a width makes that
    dimension's factor diagonal (``O(out in)``), as Plasticine's memory-saving variant does
    with 0. Memory: ``out^2 + in^2`` per weight and seed.

    Random draws: ``u`` and ``V`` come from one generator per seed, stream
    :data:`~ppo_cbp.seeding.TAG_KRON` of ``seeds[s]``: at every step ``u`` (one number), then,
    at an update, each parameter's ``V`` in the order of the groups, so seed ``s`` of a stack
    draws exactly what it draws alone. kron_torch draws ``u`` from ``random.Random(42)`` (one
    number per step, shared by all parameters) and ``V`` from torch's global generator.

    Deviations from kron_torch, each for stacked seeds, exact resuming or float64:

    - stacked seeds (``seed_dims=1``): every parameter is ``[S, ...]``; each seed has its own
      factors (``[S, d, d]``, ``[S, d]``), momentum, ``mean|G|``, ``max|T2|``, ``lb``, RMS
      clip and balancing draw; the step counts and the deterministic update schedule are
      shared (they are the same for every seed);
    - the factors are kept in float32, as kron_torch's default ``precond_dtype``, or float64
      for float64 parameters (kron_torch: float32, and its triangular solve in float32);
    - the momentum is kept in the parameter's shape (not the merged one), so that CBP's and
      ReDo's resets of a parameter's optimizer state reach it;
    - the balancing probability 0.01 is the argument ``balance_prob`` (for the tests);
    - ``momentum_into_precond_update`` is always True (kron_torch's default), ``mu_dtype``
      is the parameter's, and nothing is printed;
    - :meth:`state_dict` also holds the schedule's step and counter and the generators.

    :param params: parameters or groups (a parameter without a gradient is skipped, as in
        kron_torch; the schedule's settings are read from the first group, as there).
    :param lr: step size (default 3e-4, kron_torch's, and the learning rate Plasticine passes
        in its continual DMC PPO).
    :param b1: momentum ``b1`` in [0, 1) (default 0.9, kron_torch's).
    :param weight_decay: ``wd`` (default 0, kron_torch's; Plasticine leaves it).
    :param precond_lr: the preconditioner's step size (default 0.1, kron_torch's).
    :param precond_init_scale: ``c`` (default 1, kron_torch's).
    :param max_size_triangular: a dimension larger than this gets a diagonal factor (default
        8192, kron_torch's; Plasticine's memory-saving option sets 0, all diagonal).
    :param min_ndim_triangular: a tensor with fewer dimensions gets diagonal factors only
        (default 2, kron_torch's: biases are diagonal).
    :param memory_save_mode: None (default, kron_torch's), ``"smart_one_diag"``,
        ``"one_diag"`` or ``"all_diag"`` (kron_torch's meanings).
    :param merge_dims: merge a tensor of more than two dimensions into a matrix (default True,
        kron_torch's).
    :param max_prob, min_prob, decay, flat_start: the update-probability schedule
        (:func:`update_probability`; defaults kron_torch's 1, 0.03, 0.001, 500).
    :param balance_prob: the probability of balancing the factors at an update (kron_torch's
        0.01, "roughly every 100 updates").
    :param seed_dims: 0, or 1 for stacked parameters.
    :param seeds: one run seed per stacked network (one when ``seed_dims=0``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        b1: float = 0.9,
        weight_decay: float = 0.0,
        precond_lr: float = 0.1,
        precond_init_scale: float = 1.0,
        max_size_triangular: float = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        merge_dims: bool = True,
        max_prob: float = 1.0,
        min_prob: float = 0.03,
        decay: float = 0.001,
        flat_start: float = 500,
        balance_prob: float = 0.01,
        *,
        seed_dims: int = 0,
        seeds: Sequence[int] = (0,),
    ):
        checks = (
            ("lr", lr > 0),
            ("b1", 0.0 <= b1 < 1.0),
            ("weight_decay", weight_decay >= 0),
            ("precond_lr", precond_lr > 0),
            ("precond_init_scale", precond_init_scale > 0),
            ("max_size_triangular", max_size_triangular >= 0),
            ("min_prob", 0.0 < min_prob <= max_prob <= 1.0),
            ("decay", decay >= 0),
            ("balance_prob", 0.0 <= balance_prob <= 1.0),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name} out of range in Kron: {locals()[name]}")
        if memory_save_mode not in MEMORY_SAVE_MODES:
            raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}")
        defaults = dict(
            lr=lr,
            b1=b1,
            weight_decay=weight_decay,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            merge_dims=merge_dims,
            max_prob=max_prob,
            min_prob=min_prob,
            decay=decay,
            flat_start=flat_start,
            balance_prob=balance_prob,
        )
        super().__init__(params, defaults, seed_dims, seeds, TAG_KRON)
        self.prob_step = 0
        """Steps taken (kron_torch's ``_prob_step``): the schedule's ``n``."""
        self.update_counter = 0
        """Steps since the last preconditioner update (kron_torch's ``_update_counter``)."""
        self._schedule: tuple = ((), None, None, None)
        """What :meth:`_update_interval` knows: ``(schedule, 1 / p up to flat_start, the first
        step at min_prob, 1 / min_prob)``."""
        self._u: Tensor | None = None
        self._u_rows: list[Tensor] = []
        self._probes: dict[Tensor, Tensor] = {}
        """The kernel path's buffer for each parameter's ``V`` (not state: drawn anew)."""
        self._plans: dict[Tensor, tuple] = {}
        """The kernel path's arrays for each parameter (:meth:`_kernel_plan`)."""
        self._flags: np.ndarray | None = None
        """The step's balancing draws for the kernels (made when first needed)."""

    def _stacked(self, x: Tensor) -> Tensor:
        """``x`` with its seed dimension (``[1, ...]`` when not stacked)."""
        return x if self.seed_dims else x.unsqueeze(0)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        shape = _merged_shape(tuple(p.shape[self.seed_dims :]), group["merge_dims"])
        diagonal = _diagonal_dims(
            shape,
            group["max_size_triangular"],
            group["min_ndim_triangular"],
            group["memory_save_mode"],
        )
        dtype = torch.promote_types(p.dtype, torch.float32)
        scale = group["precond_init_scale"] ** (1 / len(shape))
        seeds = len(self.generators)
        factors = []
        for size, diag in zip(shape, diagonal):
            one = torch.ones(size, dtype=dtype, device=p.device)
            q = scale * (one if diag else torch.diag(one))
            factors.append(q.expand(seeds, *q.shape).clone())
        return {"step": 0, "momentum_buffer": torch.zeros_like(p), "Q": factors}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("Kron.step takes no closure")
        g0 = self.param_groups[0]
        self.update_counter += 1
        # the counter (an int) against 1 / p in float32, as kron_torch compares them
        do_update = self.update_counter >= self._update_interval(g0)
        if do_update:
            self.update_counter = 0
        self.prob_step += 1
        # one number per seed at every step, whether or not it is used
        u = self._uniforms()
        balance = u < g0["balance_prob"] if do_update else None
        self._flags = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                if not self._step_kernel(p, state, group, do_update, balance):
                    self._step_parameter(p, state, group, do_update, balance)

    def _uniforms(self) -> Tensor:
        """One uniform number per seed from its generator, as ``torch.rand(1)`` draws it, into
        a buffer kept from step to step (``[S]``)."""
        if self._u is None:
            g = self.generators[0]
            self._u = torch.empty(len(self.generators), device=g.device)
            self._u_rows = [self._u[s : s + 1] for s in range(len(self.generators))]
        for row, g in zip(self._u_rows, self.generators):
            row.uniform_(generator=g)
        return self._u

    def _update_interval(self, group: dict[str, Any]) -> float:
        """``float(1 / p(n))`` at ``n = prob_step`` (:func:`update_probability`, in float32),
        computed once for each of the schedule's two constant stretches: up to ``flat_start``
        (``p = max_prob``) and from the first step where it is ``min_prob`` on (it only falls
        in between); a handful of tensor operations per step otherwise."""
        schedule = tuple(group[k] for k in ("max_prob", "min_prob", "decay", "flat_start"))
        n = self.prob_step
        known = self._schedule if self._schedule[0] == schedule else (schedule, None, None, None)
        _, flat, floor_from, floor = known
        if flat is not None and n <= schedule[3]:
            return flat
        if floor_from is not None and n >= floor_from:
            return floor
        prob = update_probability(n, *schedule)
        value = float(1 / prob)
        if n <= schedule[3]:
            flat = value
        elif prob.item() == torch.tensor(schedule[1], dtype=torch.float32).item():
            floor_from, floor = n, value
        self._schedule = (schedule, flat, floor_from, floor)
        return value

    def _step_kernel(
        self,
        p: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        do_update: bool,
        balance: Tensor | None,
    ) -> bool:
        """:meth:`_step_parameter` by one kernel call where it applies (:meth:`_kernel_plan`):
        whether it did. ``V`` is drawn as there, into a buffer kept for the parameter."""
        plan = self._kernel_plan(p, state)
        if plan is None:
            return False
        arrays, factors, rows, probe = plan[4:]
        if self._flags is None:
            seeds = len(self.generators)
            self._flags = np.zeros(seeds, np.bool_) if balance is None else balance.cpu().numpy()
        if do_update:
            for row, g in zip(rows, self.generators):
                row.normal_(generator=g)
        state["step"] += 1
        kernels.kron_step_(
            *arrays,
            factors,
            probe,
            self._flags,
            update=do_update,
            step=state["step"],
            lr=group["lr"],
            b1=group["b1"],
            weight_decay=group["weight_decay"],
            precond_lr=group["precond_lr"],
        )
        return True

    def _kernel_plan(self, p: Tensor, state: dict[str, Any]) -> tuple | None:
        """``(gradient, momentum, factors, the data pointers of p and its gradient, NumPy
        views [S, d0, d1] of p, its gradient and momentum, of the factors, V's buffer's rows
        and its view)`` for the kernel, kept while the gradient, momentum and factors stay the
        same tensors and p's and the gradient's storage stay; None where the kernel does not
        apply: other than a CPU float32 or float64 parameter whose seeds are matrices
        (merged) or vectors, every dimension at most :data:`KERNEL_MAX_SIZE`, its factors
        contiguous, its gradient and momentum of its dtype and viewable as ``[S, d0, d1]``."""
        factors: list[Tensor] = state["Q"]
        grad, momentum = p.grad, state["momentum_buffer"]
        plan = self._plans.get(p)
        if (
            plan is not None
            and plan[0] is grad
            and plan[1] is momentum
            and len(plan[2]) == len(factors)
            and all(a is b for a, b in zip(plan[2], factors))
            and plan[3] == (p.data_ptr(), grad.data_ptr())
        ):
            return plan
        self._plans.pop(p, None)
        if len(factors) > 2 or max(q.shape[1] for q in factors) > KERNEL_MAX_SIZE:
            return None
        if not p.is_cpu or p.dtype not in (torch.float32, torch.float64):
            return None
        if self.generators[0].device.type != "cpu":
            return None
        tensors = (grad, momentum, *factors)
        if not all(t.dtype == p.dtype and t.is_cpu for t in tensors):
            return None
        if not all(q.is_contiguous() for q in factors):
            return None
        seeds = factors[0].shape[0]
        sizes = [q.shape[1] for q in factors]
        view = (seeds, *sizes) if len(sizes) == 2 else (seeds, 1, *sizes)  # a vector [S, 1, d]
        arrays = [_seed_matrices(t, view) for t in (p, grad, momentum)]
        if any(a is None for a in arrays):
            return None
        probe = self._probes.get(p)
        if probe is None or probe.shape != view or probe.dtype != p.dtype:
            probe = self._probes[p] = torch.empty(view, dtype=p.dtype)
        factor_arrays = [q.numpy() for q in factors]
        pointers = (p.data_ptr(), grad.data_ptr())
        plan = (grad, momentum, tuple(factors), pointers, arrays, factor_arrays, list(probe))
        plan += (probe.numpy(),)
        self._plans[p] = plan
        return plan

    def _step_parameter(
        self,
        p: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        do_update: bool,
        balance: Tensor | None,
    ) -> None:
        factors: list[Tensor] = state["Q"]
        b1 = group["b1"]
        state["step"] += 1
        momentum = state["momentum_buffer"]
        momentum.mul_(b1).add_(p.grad, alpha=1 - b1)
        shape = tuple(q.shape[1] for q in factors)
        debiased = momentum / (1 - b1 ** state["step"])
        G = self._stacked(debiased).reshape(-1, *shape).to(factors[0].dtype)
        if balance is not None and len(shape) > 1:
            norms = torch.stack([_per_seed(q).abs().amax(1) for q in factors])  # [k, S]
            target = norms.log().mean(0).exp()
            for q, n in zip(factors, norms):
                # seeds that do not balance multiply by exactly 1
                q.mul_(_as_seeds(torch.where(balance, target / n, torch.ones_like(n)), q))
        if do_update:
            self._update_preconditioner(factors, G, group["precond_lr"])
        U = G
        for i, q in enumerate(factors):
            U = _left(q, _left(q, U, i), i, transpose=True)
        rms = _per_seed(U).square().mean(1).sqrt()
        U = U * _as_seeds(torch.clamp(1.1 / (rms + 1e-12), max=1.0), U)
        U = U.reshape(p.shape)
        if group["weight_decay"] != 0 and p.dim() - self.seed_dims >= 2:
            U = U + group["weight_decay"] * p
        p.add_(U.to(p.dtype), alpha=-group["lr"])

    def _update_preconditioner(self, factors: list[Tensor], G: Tensor, precond_lr: float) -> None:
        """kron_torch's ``_update_precond`` for every seed at once; adds the noise to ``G`` in
        place (kron_torch's ``_calc_A_and_conjB`` does, and the step preconditions that)."""
        V = torch.empty_like(G)
        for s, g in enumerate(self.generators):
            V[s].normal_(generator=g)
        eps = torch.tensor(torch.finfo(torch.float32).eps, dtype=G.dtype, device=G.device)
        noise_scale = eps.sqrt() * _per_seed(G).abs().mean(1)
        G.add_(_as_seeds(noise_scale, G) * V)
        A, conj_b = G, V
        for i, q in enumerate(factors):
            A = _left(q, A, i)
            if q.dim() == 2:
                conj_b = conj_b / q.reshape(q.shape[0], *([1] * i), -1, *([1] * (G.dim() - i - 2)))
            else:
                solved = torch.linalg.solve_triangular(q, _mode(conj_b, i), upper=True, left=False)
                conj_b = _unmode(solved, i, conj_b)
        tiny = torch.finfo(G.dtype).tiny
        for i, q in enumerate(factors):
            diagonal = q.dim() == 2
            aa, bb = _gram(A, i, diagonal), _gram(conj_b, i, diagonal)
            term2 = aa + bb
            term1 = aa.sub_(bb)
            if diagonal:
                norm = term2.amax(1)  # sums of squares
                q.sub_(term1 * (q * (precond_lr / norm.clamp(min=tiny))[:, None]))
            else:
                # T2 is a Gram matrix, so its largest |entry| is on its diagonal
                norm = torch.diagonal(term2, dim1=1, dim2=2).amax(1)
                safe = torch.where(norm > 0, norm, torch.ones_like(norm))  # lb of 0 is 0
                bound = torch.where(norm > 0, _spectral_lower_bound(term2, safe), norm)
                scale = precond_lr / bound.clamp(min=tiny)
                q.sub_(_upper_product(term1, q).mul_(scale[:, None, None]))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["prob_step"] = self.prob_step
        state["update_counter"] = self.update_counter
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        prob_step = int(state_dict.pop("prob_step"))
        update_counter = int(state_dict.pop("update_counter"))
        super().load_state_dict(state_dict)
        self.prob_step, self.update_counter = prob_step, update_counter
