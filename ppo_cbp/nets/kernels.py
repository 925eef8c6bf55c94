"""Fused CPU kernels for online (batch 1) training and continual backprop's utility.

At batch 1 a training step is memory-bound: every weight matrix is read by the forward pass,
read again by the backward pass and read and written by the update. Continual backprop's
utility needs ``sum_k |w_out[k, i]|`` (and, for the adaptable utility, ``sum_j |w_in[i, j]|``)
of the weights *after* the update, which as separate tensor operations costs two or three
more passes over every matrix, more than the training step itself. The kernels here compute
those sums in the same pass that applies the update, so the utility costs only elementwise
work on ``[S, units]`` vectors. They are compiled with numba on first use (cached on disk
afterwards) and run on CPU tensors through zero-copy NumPy views; on other devices the
callers use the equivalent tensor operations.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

_FAST = {"reassoc", "contract"}
"""Let LLVM vectorise the sums (reassociation) and fuse multiply-adds; no finite-math assumptions."""


def available(*tensors: Tensor) -> bool:
    """Whether the kernels can run on these tensors (CPU, float32 or float64)."""
    return all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors
    )


def as_array(t: Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor: the kernels write through it into the tensor."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


class ArrayViews:
    """:func:`as_array`, remembered for tensor objects that are passed again and again.

    A trainer hands the same buffers to every step; making their views costs as much as a
    small kernel. A tensor whose storage is swapped (``set_``, ``.data =``) is not
    supported.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._views: dict[int, tuple[Tensor, np.ndarray]] = {}

    def __call__(self, t: Tensor) -> np.ndarray:
        entry = self._views.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        if len(self._views) >= self.capacity:
            self._views.clear()
        array = as_array(t)
        self._views[id(t)] = (t, array)
        return array


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _sgd_backward_update(
    p, delta, x, beta, alpha, below, out_abs, in_abs, target, coef
):  # pragma: no cover  # fmt: skip
    S, K, J1 = p.shape
    J = J1 - 1
    zero = beta - beta  # accumulate in the weights' precision
    for s in range(S):
        bl, oa, xs, ds = below[s], out_abs[s], x[s], delta[s]
        for j in range(J):
            bl[j] = 0.0
            oa[j] = 0.0
        # four rows at a time: the per-column sums then stay in registers for four rows
        k = 0
        while k + 4 <= K:
            d0, d1, d2, d3 = ds[k], ds[k + 1], ds[k + 2], ds[k + 3]
            a0, a1, a2, a3 = alpha * d0, alpha * d1, alpha * d2, alpha * d3
            r0, r1, r2, r3 = p[s, k], p[s, k + 1], p[s, k + 2], p[s, k + 3]
            t0 = t1 = t2 = t3 = zero
            for j in range(J):
                w0, w1, w2, w3 = r0[j], r1[j], r2[j], r3[j]
                bl[j] += d0 * w0 + d1 * w1 + d2 * w2 + d3 * w3
                xj = xs[j]
                w0 = beta * w0 + a0 * xj
                w1 = beta * w1 + a1 * xj
                w2 = beta * w2 + a2 * xj
                w3 = beta * w3 + a3 * xj
                if target is not None:  # (compiled out when None)
                    w0 = w0 + coef * target[s, k, j]
                    w1 = w1 + coef * target[s, k + 1, j]
                    w2 = w2 + coef * target[s, k + 2, j]
                    w3 = w3 + coef * target[s, k + 3, j]
                r0[j], r1[j], r2[j], r3[j] = w0, w1, w2, w3
                m0, m1, m2, m3 = abs(w0), abs(w1), abs(w2), abs(w3)
                oa[j] += m0 + m1 + m2 + m3
                t0 += m0
                t1 += m1
                t2 += m2
                t3 += m3
            xj = xs[J]
            r0[J] = beta * r0[J] + a0 * xj
            r1[J] = beta * r1[J] + a1 * xj
            r2[J] = beta * r2[J] + a2 * xj
            r3[J] = beta * r3[J] + a3 * xj
            if target is not None:
                for i in range(4):
                    p[s, k + i, J] = p[s, k + i, J] + coef * target[s, k + i, J]
            in_abs[s, k], in_abs[s, k + 1], in_abs[s, k + 2], in_abs[s, k + 3] = t0, t1, t2, t3
            k += 4
        while k < K:
            d = ds[k]
            a = alpha * d
            row = p[s, k]
            total = zero
            for j in range(J):
                w = row[j]
                bl[j] += d * w
                w = beta * w + a * xs[j]
                if target is not None:
                    w = w + coef * target[s, k, j]
                row[j] = w
                m = abs(w)
                oa[j] += m
                total += m
            row[J] = beta * row[J] + a * xs[J]
            if target is not None:
                row[J] = row[J] + coef * target[s, k, J]
            in_abs[s, k] = total
            k += 1


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _abs_sums(w, col, row):  # pragma: no cover
    S, R, C = w.shape
    zero = w[0, 0, 0] - w[0, 0, 0]
    for s in range(S):
        cs = col[s]
        cs[:] = 0
        for r in range(R):
            ws = w[s, r]
            total = zero
            for c in range(C):
                m = abs(ws[c])
                cs[c] += m
                total += m
            row[s, r] = total


def abs_sums_(weight: np.ndarray, col: np.ndarray, row: np.ndarray) -> None:
    """``col[s, c] = sum_r |W[s, r, c]|`` and ``row[s, r] = sum_c |W[s, r, c]|`` in one pass.

    ``weight`` is ``[S, R, C]`` and C-contiguous: for a consumer's weights, ``col`` holds the
    outgoing magnitude of each input column and ``row`` the incoming magnitude of each consumer
    unit, which CBP's adaptable utility needs for the next layer.
    """
    _abs_sums(weight, col, row)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _matvec(p, x, out):  # pragma: no cover
    S, K, J = p.shape
    zero = p[0, 0, 0] - p[0, 0, 0]
    for s in range(S):
        xs = x[s]
        for k in range(K):
            row = p[s, k]
            total = zero
            for j in range(J):
                total += row[j] * xs[j]
            out[s, k] = total


def matvec_(param: np.ndarray, inputs: np.ndarray, out: np.ndarray) -> None:
    """``out[s, k] = sum_j P[s, k, j] x[s, j]``: one layer's forward pass for one example.

    With ``P = [W | b]`` (``[S, K, J + 1]``) and ``x = [h, 1]`` this is ``W h + b``. Arrays
    as for :func:`sgd_backward_update_`, ``inputs`` and ``out`` C-contiguous. At batch 1 the
    product is memory-bound, and this loop streams each row once (about twice the rate of
    single-threaded BLAS ``gemv`` on a matrix that is not in cache).
    """
    _matvec(param, inputs, out)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _sgd_update(p, delta, x, beta, alpha, in_abs, target, coef):  # pragma: no cover
    S, K, J1 = p.shape
    J = J1 - 1
    zero = beta - beta
    for s in range(S):
        xs = x[s]
        for k in range(K):
            a = alpha * delta[s, k]
            row = p[s, k]
            total = zero
            for j in range(J):
                w = beta * row[j] + a * xs[j]
                if target is not None:  # (compiled out when None)
                    w = w + coef * target[s, k, j]
                row[j] = w
                total += abs(w)
            row[J] = beta * row[J] + a * xs[J]
            if target is not None:
                row[J] = row[J] + coef * target[s, k, J]
            in_abs[s, k] = total


def sgd_backward_update_(
    param: np.ndarray,
    delta: np.ndarray,
    inputs: np.ndarray,
    beta: float,
    alpha: float,
    below: np.ndarray | None,
    out_abs: np.ndarray | None,
    in_abs: np.ndarray,
    target: np.ndarray | None = None,
    coefficient: float = 0.0,
) -> None:
    """Backward pass, SGD update and weight magnitudes of one stacked layer, in one pass.

    For ``S`` networks and one example, with ``P = [W | b]`` of shape ``[S, K, J + 1]``, the
    gradient ``delta = dL/dz`` of the layer's output ``[S, K]`` and its input ``x = [h, 1]``
    ``[S, J + 1]``:

    * ``below[s, j] = sum_k delta[s, k] * W[s, k, j]`` with the weights before the update
      (the gradient with respect to the layer's input);
    * ``P <- beta * P + alpha * delta x^T`` in place (SGD with coupled L2:
      ``beta = 1 - lr * wd``, ``alpha = -lr``), in the weights' precision as ``baddbmm_``;
    * ``out_abs[s, j] = sum_k |W'[s, k, j]|`` and ``in_abs[s, k] = sum_j |W'[s, k, j]|`` of the
      updated weights (bias column excluded).

    ``below`` and ``out_abs`` None (the first layer, whose inputs are not units): neither is
    computed. With ``target`` (``[S, K, J + 1]``), the update is followed in the same pass by
    ``P <- P + coefficient * target`` (L2-Init's pull toward the initial weights, as
    :func:`sgd_apply_` takes it after the update: the same arithmetic, one pass fewer); the
    magnitudes are then of the pulled weights. All arguments are arrays of one dtype (:func:`as_array` views of CPU tensors), written or
    read in place; ``param``, ``delta`` and ``inputs`` must be C-contiguous (strided rows
    would compile to scalar code, several times slower than copying them first).
    """
    scalar = param.dtype.type
    c = scalar(coefficient)
    if below is None or out_abs is None:
        _sgd_update(param, delta, inputs, scalar(beta), scalar(alpha), in_abs, target, c)
    else:
        _sgd_backward_update(
            param, delta, inputs, scalar(beta), scalar(alpha), below, out_abs, in_abs, target, c
        )


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _backward_gradient(p, delta, x, below, grad):  # pragma: no cover
    S, K, J1 = p.shape
    J = J1 - 1
    for s in range(S):
        bl, xs, ds = below[s], x[s], delta[s]
        for j in range(J):
            bl[j] = 0.0
        for k in range(K):
            d = ds[k]
            row, g = p[s, k], grad[s, k]
            for j in range(J):
                bl[j] += d * row[j]
                g[j] = d * xs[j]
            g[J] = d * xs[J]


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _gradient(delta, x, grad):  # pragma: no cover
    S, K, J1 = grad.shape
    for s in range(S):
        xs = x[s]
        for k in range(K):
            d = delta[s, k]
            g = grad[s, k]
            for j in range(J1):
                g[j] = d * xs[j]


def backward_gradient_(
    param: np.ndarray,
    delta: np.ndarray,
    inputs: np.ndarray,
    below: np.ndarray | None,
    grad: np.ndarray,
) -> None:
    """Backward pass of one stacked layer for one example, the gradient materialised.

    With ``P = [W | b]`` ``[S, K, J + 1]``, ``delta = dL/dz`` ``[S, K]`` and the input
    ``x = [h, 1]`` ``[S, J + 1]``: ``grad[s] = delta[s] x[s]^T`` (the gradient of ``P``, bias
    column included) and ``below[s, j] = sum_k delta[s, k] W[s, k, j]``, in one pass over
    ``P``; ``below`` None (the first layer) skips the latter. For trainers whose optimizer and
    regularisers need the gradient (:class:`~ppo_cbp.nets.stacked_mlp.StackedTrainer` with
    ``gradients=True``). Arrays as for :func:`sgd_backward_update_`, ``grad`` C-contiguous.
    """
    if below is None:
        _gradient(delta, inputs, grad)
    else:
        _backward_gradient(param, delta, inputs, below, grad)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _sgd_apply(p, g, beta, alpha, out_abs, in_abs, sums):  # pragma: no cover
    S, K, J1 = p.shape
    J = J1 - 1
    zero = beta - beta
    for s in range(S):
        oa = out_abs[s]
        if sums:
            for j in range(J):
                oa[j] = 0.0
        for k in range(K):
            row, gr = p[s, k], g[s, k]
            total = zero
            for j in range(J):
                w = beta * row[j] + alpha * gr[j]
                row[j] = w
                total += abs(w)
            row[J] = beta * row[J] + alpha * gr[J]
            in_abs[s, k] = total
            if sums:  # a second loop over the row, in cache: both loops vectorise
                for j in range(J):
                    oa[j] += abs(row[j])


def sgd_apply_(
    param: np.ndarray,
    grad: np.ndarray,
    beta: float,
    alpha: float,
    out_abs: np.ndarray | None,
    in_abs: np.ndarray,
) -> None:
    """``P <- beta * P + alpha * grad`` in place (SGD with coupled L2: ``beta = 1 - lr * wd``,
    ``alpha = -lr``), with the magnitudes of :func:`sgd_backward_update_` of the updated
    weights (``out_abs`` None: not computed). ``param`` and ``grad`` ``[S, K, J + 1]``,
    C-contiguous."""
    scalar = param.dtype.type
    _sgd_apply(
        param,
        grad,
        scalar(beta),
        scalar(alpha),
        in_abs if out_abs is None else out_abs,
        in_abs,
        out_abs is not None,
    )


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _adam(p, g, m, v, wd, keep1, b2, keep2, step_size, bc2_sqrt, eps):  # pragma: no cover
    # two loops of elementwise IEEE arithmetic (no fast-math: every element is computed the
    # same way in the vectorised body and the remainder, so a seed's slice of a stack equals
    # the seed alone); error_model="numpy" lets the division vectorise
    n = p.size
    for j in range(n):
        d = g[j] + wd * p[j]
        m[j] = m[j] + keep1 * (d - m[j])
        v[j] = b2 * v[j] + keep2 * d * d
    for j in range(n):
        p[j] = p[j] - step_size * (m[j] / (np.sqrt(v[j]) / bc2_sqrt + eps))


def adam_(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One step of ``torch.optim.Adam`` (coupled weight decay, no amsgrad) on one tensor, in
    place, ``step`` the step count after it:

        g <- g + wd * p;  m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    torch's formula and order of operations (``lerp_``, ``mul_().addcmul_()``, ``addcdiv_``),
    in two passes over the tensors instead of eight. All four arrays C-contiguous, flattened
    (any shape), of one dtype; ``exp_avg`` and ``exp_avg_sq`` are the optimizer's own state.
    """
    _adam(
        param.reshape(-1),
        grad.reshape(-1),
        exp_avg.reshape(-1),
        exp_avg_sq.reshape(-1),
        *_adam_scalars(param.dtype, lr, betas, eps, weight_decay, step),
    )


def _adam_scalars(
    dtype: np.dtype,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: int,
) -> tuple:
    """Adam's constants in the kernels' order, in the parameter's dtype: ``wd, 1 - b1, b2,
    1 - b2, lr / (1 - b1^t), sqrt(1 - b2^t), eps``."""
    b1, b2 = betas
    x = dtype.type
    return (
        x(weight_decay),
        x(1.0 - b1),
        x(b2),
        x(1.0 - b2),
        x(lr / (1.0 - b1**step)),
        x(math.sqrt(1.0 - b2**step)),
        x(eps),
    )


def full_correction_age(decay_rate: float, dtype: np.dtype) -> float:
    """Age beyond which ``1 - eta^age`` rounds to exactly 1 in ``dtype``: no need to compute it."""
    if decay_rate == 0.0:
        return math.inf
    return float(math.ceil(math.log(np.finfo(dtype).eps / 4) / math.log(decay_rate)))


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _utility_update(
    utility, mean, birth, steps, h, out_abs, in_abs, fan_in, eta, full_age, adaptable, has_out
):  # pragma: no cover
    S, B, U = h.shape
    keep = 1 - eta
    weight = keep / B
    # loops over units with no branch inside, so that they vectorise
    center = np.zeros(U, dtype=utility.dtype)
    activity = np.empty(U, dtype=utility.dtype)
    for s in range(S):
        if adaptable:
            center[:] = 0
            for b in range(B):
                for i in range(U):
                    center[i] += h[s, b, i]
            for i in range(U):
                f = mean[s, i]
                f = f + keep * (center[i] / B - f)
                mean[s, i] = f
                center[i] = f
            for i in range(U):  # only young units pay for the power
                age = steps - birth[s, i]
                if age < full_age:
                    center[i] = center[i] / (1 - eta**age)
        activity[:] = 0
        for b in range(B):
            for i in range(U):
                activity[i] += abs(h[s, b, i] - center[i])
        for i in range(U):
            y = activity[i]
            if adaptable:
                y = y * fan_in / in_abs[s, i]
            if has_out:
                y = y * out_abs[s, i]
            utility[s, i] = utility[s, i] * eta + y * weight


class UtilityUpdate:
    """Continual backprop's running utility of one layer, for ``S`` networks, in one pass.

    Bound once to the layer's state arrays (:func:`as_array` views, updated in place):
    ``utility`` ``u`` and, for the adaptable contribution, the running mean activation
    ``mean`` ``f`` (``[S, units]``), and ``birth``, the step at which each unit was
    (re)initialised (its age is ``steps - birth``). Each call takes the activations ``h``
    (``[S, B, units]``) and ``out_abs``/``in_abs``, ``sum_k |w_out[k, i]|`` and
    ``sum_j |w_in[i, j]|`` per unit (``[S, units]``). With ``mean`` None, equation (1):
    ``u <- eta u + (1 - eta) mean_b |h_bi| * out_abs_i``; otherwise the adaptable contribution:
    ``f <- f + (1 - eta) (mean_b h_bi - f)``, ``hhat = f / (1 - eta^age)``,
    ``u <- eta u + (1 - eta) mean_b |h_bi - hhat_i| * out_abs_i / (in_abs_i / fan_in)``
    (see :mod:`ppo_cbp.plasticity.cbp`). ``out_abs`` None: the unit has no outgoing weights to weigh by.
    Arithmetic is in the utility's precision, as the tensor ops'.
    """

    def __init__(
        self,
        utility: np.ndarray,
        mean: np.ndarray | None,
        birth: np.ndarray,
        fan_in: int,
        decay_rate: float,
    ):
        scalar = utility.dtype.type
        self.utility, self.mean, self.birth = utility, mean, birth
        self.fan_in, self.decay_rate = scalar(fan_in), scalar(decay_rate)
        self.full_age = full_correction_age(decay_rate, utility.dtype)

    def __call__(
        self,
        steps: int,
        h: np.ndarray,
        out_abs: np.ndarray | None,
        in_abs: np.ndarray | None,
        fan_in: float | None = None,
    ) -> None:
        """One step's update; ``fan_in`` overrides the layer's (1 when ``in_abs`` is a mean)."""
        u = self.utility
        _utility_update(
            u,
            u if self.mean is None else self.mean,
            self.birth,
            steps,
            h,
            u if out_abs is None else out_abs,
            u if in_abs is None else in_abs,
            self.fan_in if fan_in is None else u.dtype.type(fan_in),
            self.decay_rate,
            self.full_age,
            self.mean is not None,
            out_abs is not None,
        )


# --- architectural methods: LayerNorm and the paired activations (CReLU, DFF) at batch 1 ---


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _layer_norm_forward(z, norm, eps, xhat, rstd, y):  # pragma: no cover
    S, n = z.shape
    zero = eps - eps
    for s in range(S):
        zs = z[s]
        total = zero
        for i in range(n):
            total += zs[i]
        mean = total / n
        sq = zero
        for i in range(n):
            d = zs[i] - mean
            sq += d * d
        r = 1.0 / math.sqrt(sq / n + eps)
        rstd[s] = r
        gain, offset = norm[s, 0], norm[s, 1]
        for i in range(n):
            x = (zs[i] - mean) * r
            xhat[s, i] = x
            y[s, i] = gain[i] * x + offset[i]


def layer_norm_forward_(
    z: np.ndarray,
    norm: np.ndarray,
    eps: float,
    xhat: np.ndarray,
    rstd: np.ndarray,
    y: np.ndarray,
) -> None:
    """LayerNorm of one example per network (``z``, ``xhat``, ``y`` ``[S, n]`` with C-contiguous
    rows; ``norm`` ``[S, 2, n]``, the gain then the offset): ``mu = mean_i z_i``,
    ``sigma^2 = mean_i (z_i - mu)^2`` (biased), ``rstd = 1 / sqrt(sigma^2 + eps)`` (``[S]``),
    ``xhat = (z - mu) rstd`` and ``y = gain * xhat + offset``, as ``nn.LayerNorm``. ``xhat``
    and ``rstd`` are what :func:`layer_norm_backward_` needs."""
    _layer_norm_forward(z, norm, z.dtype.type(eps), xhat, rstd, y)


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _layer_norm_backward(dy, xhat, rstd, norm, dz, grad, beta, alpha, update):  # pragma: no cover
    S, n = dy.shape
    zero = beta - beta
    for s in range(S):
        gain, offset = norm[s, 0], norm[s, 1]
        sum_d = zero
        sum_dx = zero
        for i in range(n):
            g = dy[s, i] * gain[i]
            sum_d += g
            sum_dx += g * xhat[s, i]
        mean_d = sum_d / n
        mean_dx = sum_dx / n
        r = rstd[s]
        for i in range(n):
            d = dy[s, i]
            x = xhat[s, i]
            dz[s, i] = r * (d * gain[i] - mean_d - x * mean_dx)  # with the gain before the step
            if update:
                gain[i] = beta * gain[i] + alpha * (d * x)
                offset[i] = beta * offset[i] + alpha * d
            else:
                grad[s, 0, i] = d * x
                grad[s, 1, i] = d


def layer_norm_backward_(
    dy: np.ndarray,
    xhat: np.ndarray,
    rstd: np.ndarray,
    norm: np.ndarray,
    dz: np.ndarray,
    grad: np.ndarray | None,
    beta: float,
    alpha: float,
) -> None:
    """Backward pass of :func:`layer_norm_forward_` for one example per network (``[S, n]``
    arrays, ``rstd`` ``[S]``, ``norm`` ``[S, 2, n]``): with ``g = dy * gain``,
    ``dz = rstd (g - mean_i g_i - xhat mean_i (g_i xhat_i))``, ``dgain = dy * xhat``,
    ``doffset = dy``. ``grad`` (``[S, 2, n]``): the gradient of ``norm`` is written there; None:
    SGD with coupled L2 is applied in place instead, ``norm <- beta norm + alpha grad``
    (``beta = 1 - lr wd``, ``alpha = -lr``), after ``dz`` has read the gain."""
    scalar = dy.dtype.type
    _layer_norm_backward(
        dy,
        xhat,
        rstd,
        norm,
        dz,
        norm if grad is None else grad,
        scalar(beta),
        scalar(alpha),
        grad is None,
    )


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _paired_forward(y, features, units, fourier):  # pragma: no cover
    S, n = y.shape
    for s in range(S):
        for i in range(n):
            v = y[s, i]
            if fourier:
                a, b = math.sin(v), math.cos(v)
                u = (abs(a) + abs(b)) / 2
            else:
                a, b = max(v, 0.0), max(-v, 0.0)
                u = (a + b) / 2
            features[s, 2 * i] = a
            features[s, 2 * i + 1] = b
            units[s, i] = u


def paired_forward_(y: np.ndarray, features: np.ndarray, units: np.ndarray, kind: str) -> None:
    """A paired activation of one example per network: unit ``i``'s two outputs into
    ``features[:, 2i], features[:, 2i + 1]`` (``[S, >= 2n]``; CReLU ``relu(y), relu(-y)``,
    DFF ``sin y, cos y``) and its activation, the mean magnitude of the two, into ``units``
    (``[S, n]``), as :class:`~ppo_cbp.nets.crelu.CReLU` and :class:`~ppo_cbp.nets.dff.DFF`
    define them."""
    _paired_forward(y, features, units, kind == "dff")


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _paired_backward(dfeatures, y, dy, fourier):  # pragma: no cover
    S, n = y.shape
    for s in range(S):
        for i in range(n):
            v = y[s, i]
            a, b = dfeatures[s, 2 * i], dfeatures[s, 2 * i + 1]
            if fourier:
                dy[s, i] = a * math.cos(v) - b * math.sin(v)
            else:
                dy[s, i] = (a if v > 0 else 0.0) - (b if v < 0 else 0.0)


def paired_backward_(dfeatures: np.ndarray, y: np.ndarray, dy: np.ndarray, kind: str) -> None:
    """Backward pass of :func:`paired_forward_`: ``dy_i = d_{2i} 1[y_i > 0] - d_{2i+1} 1[y_i <
    0]`` (CReLU) or ``d_{2i} cos y_i - d_{2i+1} sin y_i`` (DFF), ``d = dL/dfeatures``."""
    _paired_backward(dfeatures, y, dy, kind == "dff")


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _project_norm(p, target, cols):  # pragma: no cover
    S, K, _ = p.shape
    for s in range(S):
        sq = p[s, 0, 0] - p[s, 0, 0]
        for k in range(K):
            row = p[s, k]
            for j in range(cols):
                sq += row[j] * row[j]
        norm = math.sqrt(sq)
        if norm > 0:  # all zero: no direction to keep, left at 0
            scale = target[s] / norm
            for k in range(K):
                row = p[s, k]
                for j in range(cols):
                    row[j] = row[j] * scale


def project_norm_(param: np.ndarray, target: np.ndarray, cols: int) -> None:
    """``T_s <- T_s * target_s / ||T_s||_F`` for each network ``s``, with ``T_s`` the first
    ``cols`` columns of ``param[s]`` (``[S, K, J]``, C-contiguous; a layer's ``P = [W | b]``
    with ``cols = J - 1`` projects its weight, not its bias); a ``T_s`` of norm 0 is left
    as it is. Normalize-and-Project's projection, one pass per tensor."""
    _project_norm(param, target, cols)


@numba.njit(cache=True, nogil=True)
def _upgd_trace(u, g, p, beta, neg_keep, top):  # pragma: no cover
    S, R, C = p.shape
    for s in range(S):
        m = top[s]
        for r in range(R):
            for c in range(C):
                v = u[s, r, c] * beta + neg_keep * (g[s, r, c] * p[s, r, c])
                u[s, r, c] = v
                if v > m or v != v:  # NaN wins, as in torch's amax
                    m = v
        top[s] = m


def upgd_trace_(
    trace: np.ndarray,
    grad: np.ndarray,
    param: np.ndarray,
    beta_utility: float,
    top: np.ndarray,
) -> None:
    """UPGD's utility trace of one parameter, one pass: ``u <- beta_u u - (1 - beta_u) (g
    theta)``, and ``top_s <- max(top_s, max u_s)`` (NaN if any is). ``trace``, ``grad``,
    ``param`` ``[S, R, C]`` of one dtype, any strides (a layer's weight is a view of its
    ``[W | b]``); ``top`` ``[S]`` in that dtype."""
    x = param.dtype.type
    _upgd_trace(trace, grad, param, x(beta_utility), x(-(1.0 - beta_utility)), top)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _upgd_apply(p, g, u, noise, factor, sigma, decay, neg_lr):  # pragma: no cover
    S, R, C = p.shape
    one = p.dtype.type(1.0)
    for s in range(S):
        f = factor[s]
        for r in range(R):
            for c in range(C):
                keep = one - one / (one + np.exp(-(u[s, r, c] * f)))
                step = (noise[s, r, c] * sigma + g[s, r, c]) * keep
                p[s, r, c] = p[s, r, c] * decay + neg_lr * step


def upgd_apply_(
    param: np.ndarray,
    grad: np.ndarray,
    trace: np.ndarray,
    noise: np.ndarray,
    factor: np.ndarray,
    *,
    lr: float,
    weight_decay: float,
    sigma: float,
) -> None:
    """UPGD's update of one parameter, one pass: ``theta <- (1 - lr wd) theta - lr (g + sigma
    xi) (1 - sigmoid(u factor_s))``, ``factor_s = 1 / ((1 - beta_u^t) max u)`` per seed, the
    operations in the order of UPGD's tensor path. Arrays as in :func:`upgd_trace_`, ``noise``
    the draws ``xi``, ``factor`` ``[S]``."""
    x = param.dtype.type
    _upgd_apply(param, grad, trace, noise, factor, x(sigma), x(1.0 - lr * weight_decay), x(-lr))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _upgd_apply_given(p, g, s_, noise, sigma, decay, neg_lr):  # pragma: no cover
    S, R, C = p.shape
    one = p.dtype.type(1.0)
    for s in range(S):
        for r in range(R):
            for c in range(C):
                step = (noise[s, r, c] * sigma + g[s, r, c]) * (one - s_[s, r, c])
                p[s, r, c] = p[s, r, c] * decay + neg_lr * step


def upgd_apply_given_(
    param: np.ndarray,
    grad: np.ndarray,
    protection: np.ndarray,
    noise: np.ndarray,
    *,
    lr: float,
    weight_decay: float,
    sigma: float,
) -> None:
    """:func:`upgd_apply_` with ``s = sigmoid(u factor_s)`` given (``protection``, of
    ``param``'s shape), for large tensors: torch's vectorised sigmoid is faster than the
    kernel's scalar ``exp``."""
    x = param.dtype.type
    _upgd_apply_given(param, grad, protection, noise, x(sigma), x(1.0 - lr * weight_decay), x(-lr))


@numba.njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")  # vectorised division
def _trac_begin(p, ref, g, before, total, h, keep):  # pragma: no cover
    S, N = p.shape
    for s in range(S):
        t = total[s]
        acc = 0.0
        for i in range(N):
            b = p[s, i]
            acc += np.float64(((b - ref[s, i]) / t) * g[s, i])
        h[s] += acc
        if keep:
            for i in range(N):
                before[s, i] = p[s, i]


def trac_begin_(
    param: np.ndarray,
    reference: np.ndarray,
    grad: np.ndarray,
    before: np.ndarray,
    total: np.ndarray,
    h: np.ndarray,
    *,
    keep: bool = True,
) -> None:
    """TRAC before its base optimizer's step, one pass over a parameter: ``h_s += sum_i
    float64(((theta - theta_ref) / total_s) * g)``, the product in the parameter's dtype as
    TRAC's tensor path takes it, and (``keep``) ``before <- theta``. ``param``, ``reference``,
    ``grad`` and ``before`` ``[S, N]`` of one dtype, C-contiguous; ``total`` ``[S]`` in that
    dtype; ``h`` ``[S]`` float64, accumulated into."""
    _trac_begin(param, reference, grad, before, total, h, keep)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _trac_apply(p, ref, before, total, scale):  # pragma: no cover
    S, N = p.shape
    for s in range(S):
        t, c = total[s], scale[s]
        for i in range(N):
            b, r = before[s, i], ref[s, i]
            p[s, i] = r + ((b - r) / t + (p[s, i] - b)) * c


def trac_apply_(
    param: np.ndarray,
    reference: np.ndarray,
    before: np.ndarray,
    total: np.ndarray,
    scale: np.ndarray,
) -> None:
    """TRAC after its base optimizer's step, one pass over a parameter: ``theta <- theta_ref +
    ((before - theta_ref) / total_s + (theta - before)) * scale_s`` (``theta - before`` is the
    base's update), in the parameter's dtype, arrays as in :func:`trac_begin_`."""
    _trac_apply(param, reference, before, total, scale)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _trac_sgd_apply(p, ref, g, total, scale, neg_lr, wd):  # pragma: no cover
    S, N = p.shape
    for s in range(S):
        t, c = total[s], scale[s]
        for i in range(N):
            b, r = p[s, i], ref[s, i]
            stepped = b + neg_lr * (g[s, i] + wd * b)
            p[s, i] = r + ((b - r) / t + (stepped - b)) * c


def trac_sgd_apply_(
    param: np.ndarray,
    reference: np.ndarray,
    grad: np.ndarray,
    total: np.ndarray,
    scale: np.ndarray,
    lr: float,
    weight_decay: float,
) -> None:
    """:func:`trac_apply_` with a plain SGD base folded in, one pass: ``stepped = theta - lr (g
    + wd theta)`` (torch's SGD, coupled weight decay), then ``theta <- theta_ref + ((theta -
    theta_ref) / total_s + (stepped - theta)) * scale_s``, in the parameter's dtype."""
    x = param.dtype.type
    _trac_sgd_apply(param, reference, grad, total, scale, x(-lr), x(weight_decay))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _trac_adam_apply(
    p, ref, g, m, v, total, scale, wd, keep1, b2, keep2, step_size, bc2_sqrt, eps
):  # pragma: no cover
    # per seed two loops over rows, as _adam's: each vectorises
    S, N = p.shape
    for s in range(S):
        t, c = total[s], scale[s]
        ps, rs, gs, ms, vs = p[s], ref[s], g[s], m[s], v[s]
        for i in range(N):
            d = gs[i] + wd * ps[i]
            ms[i] = ms[i] + keep1 * (d - ms[i])
            vs[i] = b2 * vs[i] + keep2 * d * d
        for i in range(N):
            b, r = ps[i], rs[i]
            stepped = b - step_size * (ms[i] / (np.sqrt(vs[i]) / bc2_sqrt + eps))
            ps[i] = r + ((b - r) / t + (stepped - b)) * c


def trac_adam_apply_(
    param: np.ndarray,
    reference: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    total: np.ndarray,
    scale: np.ndarray,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """:func:`trac_apply_` with ``torch.optim.Adam``'s step folded in, one pass: the moments
    and ``stepped`` as :func:`adam_` computes them (``step`` the count after this step), then
    ``theta <- theta_ref + ((theta - theta_ref) / total_s + (stepped - theta)) * scale_s``;
    ``exp_avg`` and ``exp_avg_sq`` ``[S, N]``, the optimizer's own state."""
    constants = _adam_scalars(param.dtype, lr, betas, eps, weight_decay, step)
    _trac_adam_apply(param, reference, grad, exp_avg, exp_avg_sq, total, scale, *constants)


@numba.njit(cache=True, nogil=True)
def _erfi_of(x, limit):  # pragma: no cover
    z = min(max(x, -limit), limit)
    a = abs(z)
    term = a  # a^(2n+1) / n!
    total = a
    x2 = a * a
    n = 0
    while term > 0.0:
        n += 1
        term *= x2 / n
        part = term / (2 * n + 1)
        total += part
        if n > x2 and part <= total * 1e-17:  # past the largest term, below resolution
            break
    return math.copysign(total * (2.0 / math.sqrt(math.pi)), z)


@numba.njit(cache=True, nogil=True)
def _erfi(x, out, limit):  # pragma: no cover
    for k in range(x.size):
        out[k] = _erfi_of(x[k], limit)


def erfi_(x: np.ndarray, out: np.ndarray, limit: float) -> None:
    """``erfi`` of each element of float64 ``x`` (clamped to ``+-limit``) into ``out``, by its
    Maclaurin series ``2 / sqrt(pi) sum_n x^(2n+1) / (n! (2n+1))`` (all terms of one sign),
    summed term by term until past the largest and under ``1e-17`` of the sum: the 30 or so
    terms a small argument needs instead of a fixed 900."""
    _erfi(x.reshape(-1), out.reshape(-1), limit)


@numba.njit(cache=True, nogil=True)
def _trac_tuners(h, betas, variance, sigma, s, prior, eps, limit, scale):  # pragma: no cover
    S, B = s.shape
    root2 = math.sqrt(2.0)
    for i in range(S):
        total = 0.0
        for j in range(B):
            b = betas[j]
            variance[i, j] = variance[i, j] * (b * b) + h[i] * h[i]
            sigma[i, j] = sigma[i, j] * b - h[i]
            s[i, j] = prior * _erfi_of(
                sigma[i, j] / (root2 * math.sqrt(variance[i, j]) + eps), limit
            )
            total += s[i, j]
        scale[i] = max(total, 0.0)


def trac_tuners_(
    h: np.ndarray,
    betas: np.ndarray,
    variance: np.ndarray,
    sigma: np.ndarray,
    s: np.ndarray,
    prior: float,
    eps: float,
    limit: float,
    scale: np.ndarray,
) -> None:
    """TRAC's tuners in one call, float64: for each seed ``i`` and discount ``beta_j``,
    ``v <- v beta_j^2 + h_i^2``, ``sigma <- sigma beta_j - h_i``, ``s = prior erfi(sigma /
    (sqrt 2 sqrt v + eps))`` (:func:`erfi_`'s series, clamped to ``+-limit``), and ``scale_i =
    max(sum_j s_ij, 0)``; ``variance``, ``sigma``, ``s`` ``[S, B]`` in place."""
    _trac_tuners(h, betas, variance, sigma, s, prior, eps, limit, scale)


# ---- PSGD Kron: one call per small parameter -----------------------------------------------
# Each seed's gradient is a matrix [d0, d1] (a vector: [1, d1] without Q0); a factor is upper
# triangular [d, d] or diagonal, the latter passed as [1, d] (its diagonal in row 0). Plain
# IEEE arithmetic in the arrays' dtype, no fast-math: every seed is computed by the same
# operations in the same order, so a seed's slice of a stack equals the seed alone. The inner
# loops run along whole rows (the multiply-adds into one output row at a time, the zeros off a
# triangle included, as a matrix product takes them), which vectorise without reassociation.


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _kron_transpose(x, out):  # pragma: no cover
    R, C = x.shape
    for r in range(R):
        for c in range(C):
            out[c, r] = x[r, c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _kron_left(q, diag, transpose, x, out):  # pragma: no cover
    # out = Q x (Q^T x with transpose) along dimension 0 of x [R, C]
    R, C = x.shape
    if diag:
        for a in range(R):
            c = q[0, a]
            for b in range(C):
                out[a, b] = x[a, b] * c
        return
    for a in range(R):
        oa = out[a]
        for b in range(C):
            oa[b] = 0
        lo, hi = (0, a + 1) if transpose else (a, R)
        for n in range(lo, hi):
            c = q[n, a] if transpose else q[a, n]
            xn = x[n]
            for b in range(C):
                oa[b] += c * xn[b]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _kron_right(q, qt, diag, transpose, x, out):  # pragma: no cover
    # out = x Q^T (x Q without transpose) along dimension 1 of x [R, C]; qt = Q^T
    R, C = x.shape
    if diag:
        for a in range(R):
            for b in range(C):
                out[a, b] = x[a, b] * q[0, b]
        return
    for a in range(R):
        oa, xa = out[a], x[a]
        for b in range(C):
            oa[b] = 0
        for n in range(C):  # whole rows of Q^T or Q (zeros off the triangle), as a product
            c, qn = xa[n], (qt[n] if transpose else q[n])
            for b in range(C):
                oa[b] += c * qn[b]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _kron_solve(q0, diag0, x):  # pragma: no cover
    # x <- Q0^-T x in place: forward substitution down the rows (x Q^-1 = (Q^-T x^T)^T)
    R, C = x.shape
    if diag0:
        for a in range(R):
            for b in range(C):
                x[a, b] = x[a, b] / q0[0, a]
        return
    for k in range(R):
        xk, dk = x[k], q0[k, k]
        for b in range(C):
            xk[b] = xk[b] / dk
        for j in range(k + 1, R):
            c, xj = q0[k, j], x[j]
            for b in range(C):
                xj[b] -= c * xk[b]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _kron_absmax(x, m):  # pragma: no cover
    # max(m, max |x|), a NaN kept as torch's amax keeps it
    for a in range(x.shape[0]):
        for b in range(x.shape[1]):
            v = abs(x[a, b])
            if v > m or v != v:
                m = v
    return m


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _kron_factor(q, diag, xa, xb, precond_lr, tiny, zero, one, t1, t2, vectors):  # pragma: no cover
    # Q <- Q - T1 Q * (precond_lr / norm) for one seed's factor, T1 = xa^T xa - xb^T xb and T2
    # = xa^T xa + xb^T xb (their diagonals for a diagonal Q); xa, xb [R, d]; t1, t2 [d, d] ([1,
    # d] for a diagonal Q) and vectors [3, d] work space. a / b of a number and an array is
    # (1 / b) * a, as torch computes it
    R, d = xa.shape
    norm = zero
    for a in range(t1.shape[0]):
        for c in range(d):
            t1[a, c] = 0
            t2[a, c] = 0
    if diag:
        u1, u2 = t1[0], t2[0]
        for r in range(R):
            for a in range(d):
                u1[a] += xa[r, a] * xa[r, a]
                u2[a] += xb[r, a] * xb[r, a]
        for a in range(d):
            aa, bb = u1[a], u2[a]
            u2[a] = aa + bb
            u1[a] = aa - bb
            v = u2[a]  # sums of squares
            if v > norm or v != v:
                norm = v
        if norm < tiny:
            norm = tiny
        scale = (one / norm) * precond_lr
        for a in range(d):
            q[0, a] = q[0, a] - u1[a] * (q[0, a] * scale)
        return
    for r in range(R):  # xa^T xa and xb^T xb by rows (exactly symmetric: the same products)
        ar, br = xa[r], xb[r]
        for a in range(d):
            ca, cb, ua, ub = ar[a], br[a], t1[a], t2[a]
            for c in range(d):
                ua[c] += ca * ar[c]
            for c in range(d):
                ub[c] += cb * br[c]
    for a in range(d):
        ua, ub = t1[a], t2[a]
        for c in range(d):
            aa, bb = ua[c], ub[c]
            ub[c] = aa + bb
            ua[c] = aa - bb
    for a in range(d):  # T2's largest |entry| is on its diagonal (a Gram matrix)
        v = t2[a, a]
        if v > norm or v != v:
            norm = v
    bound = norm
    if norm > zero:  # the spectral lower bound of T2 (0 when T2 = 0)
        for a in range(d):
            for c in range(d):
                t2[a, c] = t2[a, c] / norm
        cols, y, z = vectors[0], vectors[1], vectors[2]
        for j in range(d):
            cols[j], y[j], z[j] = 0, 0, 0
        for i in range(d):
            for j in range(d):
                cols[j] += t2[i, j] * t2[i, j]
        best = 0
        for j in range(1, d):
            if cols[j] > cols[best]:  # the first maximum, as torch.argmax
                best = j
        for i in range(d):
            c = t2[i, best]
            for k in range(d):
                y[k] += c * t2[i, k]
        s = zero
        for k in range(d):
            s += y[k] * y[k]
        s = np.sqrt(s)
        for k in range(d):
            y[k] = y[k] / s
        for k in range(d):  # T2 y by the rows of the symmetric T2
            c = y[k]
            for i in range(d):
                z[i] += c * t2[k, i]
        s = zero
        for i in range(d):
            s += z[i] * z[i]
        bound = np.sqrt(s) * norm
    if bound < tiny:
        bound = tiny
    scale = (one / bound) * precond_lr
    row = vectors[0]
    for a in range(d):  # row a of triu(T1) Q needs rows >= a of the old Q
        for c in range(d):
            row[c] = 0
        for b in range(a, d):
            c, qb = t1[a, b], q[b]
            for k in range(d):  # whole rows (zeros below the diagonal), as a product does
                row[k] += c * qb[k]
        qa = q[a]
        for c in range(d):
            qa[c] = qa[c] - row[c] * scale


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _kron_step(
    p, g, m, q0, q1, v, diag0, diag1, vector, update, balance, b1, keep, debias, noise,
    precond_lr, tiny, wd, neg_lr, rms_eps, clip
):  # pragma: no cover  # fmt: skip
    S, d0, d1 = p.shape
    c = np.empty(4, p.dtype)  # the constants in the dtype
    c[0], c[1], c[2], c[3] = 0, 1, 2, d0 * d1
    zero, one, two, count = c[0], c[1], c[2], c[3]
    G = np.empty((d0, d1), p.dtype)
    T = np.empty((d0, d1), p.dtype)
    U = np.empty((d0, d1), p.dtype)
    q1t = np.empty((d1, d1), p.dtype)
    A = np.empty((d0, d1), p.dtype)
    B = np.empty((d0, d1), p.dtype)
    At = np.empty((d1, d0), p.dtype)
    Bt = np.empty((d1, d0), p.dtype)
    # the factor updates' T1, T2 and vectors
    w0 = np.empty((2, 1 if diag0 else d0, d0), p.dtype)
    w1 = np.empty((2, 1 if diag1 else d1, d1), p.dtype)
    v0 = np.empty((3, d0), p.dtype)
    v1 = np.empty((3, d1), p.dtype)
    for s in range(S):
        ps, gs, ms, Q0, Q1 = p[s], g[s], m[s], q0[s], q1[s]
        for a in range(d0):
            for b in range(d1):
                x = ms[a, b] * b1
                x = x + keep * gs[a, b]
                ms[a, b] = x
                G[a, b] = x / debias
        if balance[s] and not vector:
            n0, n1 = _kron_absmax(Q0, zero), _kron_absmax(Q1, zero)
            target = np.exp((np.log(n0) + np.log(n1)) / two)
            f0, f1 = target / n0, target / n1
            for a in range(Q0.shape[0]):
                for b in range(Q0.shape[1]):
                    Q0[a, b] = Q0[a, b] * f0
            for a in range(Q1.shape[0]):
                for b in range(Q1.shape[1]):
                    Q1[a, b] = Q1[a, b] * f1
        if update:
            vs = v[s]
            total = zero
            for a in range(d0):
                for b in range(d1):
                    total += abs(G[a, b])
            scale = noise * (total / count)
            for a in range(d0):
                for b in range(d1):
                    G[a, b] = G[a, b] + scale * vs[a, b]
                    B[a, b] = vs[a, b]
            if not diag1:
                _kron_transpose(Q1, q1t)
            if vector:  # no Q0
                _kron_right(Q1, q1t, diag1, True, G, A)
            else:
                _kron_left(Q0, diag0, False, G, T)
                _kron_right(Q1, q1t, diag1, True, T, A)
                _kron_solve(Q0, diag0, B)
            _kron_transpose(B, Bt)
            _kron_solve(Q1, diag1, Bt)  # conjB^T
            _kron_transpose(Bt, B)
            if not vector:
                _kron_transpose(A, At)
                _kron_factor(Q0, diag0, At, Bt, precond_lr, tiny, zero, one, w0[0], w0[1], v0)
            _kron_factor(Q1, diag1, A, B, precond_lr, tiny, zero, one, w1[0], w1[1], v1)
        # U = Q0^T Q0 G Q1^T Q1 with the new factors
        if not diag1:
            _kron_transpose(Q1, q1t)
        if vector:
            _kron_right(Q1, q1t, diag1, True, G, T)
        else:
            _kron_left(Q0, diag0, False, G, T)
            _kron_left(Q0, diag0, True, T, U)
            _kron_right(Q1, q1t, diag1, True, U, T)
        _kron_right(Q1, q1t, diag1, False, T, U)
        total = zero
        for a in range(d0):
            for b in range(d1):
                total += U[a, b] * U[a, b]
        factor = (one / (np.sqrt(total / count) + rms_eps)) * clip
        if factor > one:
            factor = one
        for a in range(d0):
            for b in range(d1):
                x = U[a, b] * factor
                if wd != zero and not vector:
                    x = x + wd * ps[a, b]
                ps[a, b] = ps[a, b] + neg_lr * x


def kron_step_(
    param: np.ndarray,
    grad: np.ndarray,
    momentum: np.ndarray,
    factors: list[np.ndarray],
    probe: np.ndarray,
    balance: np.ndarray,
    *,
    update: bool,
    step: int,
    lr: float,
    b1: float,
    weight_decay: float,
    precond_lr: float,
) -> None:
    """One step of PSGD Kron (:class:`ppo_cbp.plasticity.kron.Kron`, its tensor path's
    operations in its order) on one parameter whose seeds are matrices (two factors) or vectors
    (one), in place, every seed ``s`` in turn:

        m <- m b1 + (1 - b1) g;   G = m / (1 - b1^step)
        balance[s] (matrices only): Q_i <- Q_i * (target / max|Q_i|),  target = exp((log
            max|Q_0| + log max|Q_1|) / 2)
        update: G <- G + sqrt(eps_f32) * mean|G| * V;  A = Q0 G Q1^T;  conjB = Q0^-T V Q1^-1
            (substitution, or division for a diagonal factor); with both from the old
            factors, for each i: T1 = A_(i) A_(i)^T - conjB_(i) conjB_(i)^T, T2 = A_(i)
            A_(i)^T + conjB_(i) conjB_(i)^T (the diagonals for a diagonal factor), n = max
            T2_aa; diagonal: Q <- Q - T1 * (Q * c), c = (1 / max(n, tiny)) * precond_lr;
            triangular: Q <- Q - (triu(T1) Q) * c, c = (1 / max(lb, tiny)) * precond_lr, lb
            the spectral lower bound of T2 (its column of largest norm after division by n,
            the first on a tie; 0 when n = 0)
        U = Q0^T Q0 G Q1^T Q1;  U <- U * min((1 / (rms(U) + 1e-12)) * 1.1, 1)
        theta <- theta + (-lr) (U + wd theta)   (the weight decay term only for matrices and
            wd != 0)

    A vector is the matrix ``[1, d]`` without ``Q0`` (nor balancing, nor weight decay). All in
    the parameter's dtype (float32 or float64), sums left to right. ``param``, ``grad``,
    ``momentum`` and ``probe`` (``V``, drawn by the caller) ``[S, d0, d1]`` (``[S, 1, d]`` for
    vectors), of one dtype, any strides (``momentum`` and ``probe`` best C-contiguous);
    ``factors`` ``[Q0, Q1]`` or ``[Q]``, each ``[S, d, d]`` (upper triangular) or ``[S, d]``
    (diagonal), C-contiguous, in place; ``balance`` ``[S]`` bool (all False outside an
    update); ``step`` the momentum's step count after this step."""
    x = param.dtype.type
    key = (param.dtype, b1, weight_decay, precond_lr)  # not lr: a schedule would grow this
    constants = _KRON_CONSTANTS.get(key)
    if constants is None:  # the settings, sqrt(eps_f32), tiny, 1e-12 and 1.1 in the dtype
        eps = np.sqrt(x(np.finfo(np.float32).eps))
        tiny = x(np.finfo(param.dtype).tiny)
        constants = (x(b1), x(1 - b1), eps, x(precond_lr), tiny, x(weight_decay))
        constants = _KRON_CONSTANTS[key] = (*constants, x(1e-12), x(1.1))
    b1_, keep, noise, precond_lr_, tiny, wd, rms_eps, clip = constants
    S = param.shape[0]
    q0, q1 = factors[0], factors[-1]  # a vector's Q0 unused
    _kron_step(
        param,
        grad,
        momentum,
        q0 if q0.ndim == 3 else q0.reshape(S, 1, q0.shape[-1]),
        q1 if q1.ndim == 3 else q1.reshape(S, 1, q1.shape[-1]),
        probe,
        q0.ndim == 2,
        q1.ndim == 2,
        len(factors) == 1,
        update,
        balance,
        b1_,
        keep,
        x(1 - b1**step),
        noise,
        precond_lr_,
        tiny,
        wd,
        x(-lr),
        rms_eps,
        clip,
    )


_KRON_CONSTANTS: dict[tuple, tuple] = {}
