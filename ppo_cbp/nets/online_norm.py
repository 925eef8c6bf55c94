"""Online Normalization (Chiley et al., "Online Normalization for Training Neural Networks",
NeurIPS 2019) for S stacked layers, with its forward and backward written out by hand.

The loss-of-plasticity paper runs it on Online Permuted MNIST (Extended Data Fig. 4, green).
Here (:class:`~ppo_cbp.nets.stacked_mlp.StackedMLP`) it sits after every hidden linear layer, before the
activation, as in the Online Normalization authors' MLP (the paper's methods text does not
say where):

    h_l = f(OnlineNorm_l(W_l h_{l-1} + b_l))

The linear layers keep their biases (the authors' MLP drops them); the running mean absorbs a
constant shift, so ``b_l`` acts only while ``mu`` catches up with it.

One layer normalizes each of its ``n`` features separately. Every example is one time step
``t`` (the examples of a minibatch are taken in order, one after the other). Feature by
feature, with ``x_t`` the layer's input (a linear layer's output), the forward pass uses the
statistics of the *previous* step and then updates them (equations 8a-c as the authors'
reference code numbers them):

    y_t        = (x_t - mu_{t-1}) / s_{t-1},        s_{t-1} = sqrt(sigma^2_{t-1} + eps)
    mu_t       = alpha_f mu_{t-1} + (1 - alpha_f) x_t
    sigma^2_t  = alpha_f sigma^2_{t-1} + alpha_f (1 - alpha_f) (x_t - mu_{t-1})^2

with ``mu_0 = 0``, ``sigma^2_0 = 1``. (For a fully connected layer a sample has one value per
feature, so the paper's within-sample mean is ``x_t`` and its within-sample variance 0.) The
paper's layer then applies the learned gain and bias and its layer scaling, which divides by
the root mean square over the layer's ``n`` features of one example so that errors of the
running estimates cannot compound from layer to layer:

    a_t = gamma * y_t + beta,        z_t = a_t / r_t,        r_t = sqrt(mean_i a_{t,i}^2 + eps_ls)

(``gamma_0 = 1``, ``beta_0 = 0``; ``z_t`` goes to the activation function.)

Backward. Given ``z'_t = dL/dz_t``, layer scaling and the affine map are differentiated
exactly,

    a'_t = (z'_t - mean_i(z'_{t,i} z_{t,i}) z_t) / r_t,   gamma' = a'_t y_t,   beta' = a'_t,
    y'_t = gamma * a'_t,

and the normalizer's gradient goes through the paper's error normalisation (equations 11-12):
two control processes, one per feature, with decay ``alpha_b``. The first removes from the
gradient its component along the normalized output ``y``, the second its component along the
1-vector (its mean), each estimated as a running sum over past steps:

    x~'_t     = y'_t - (1 - alpha_b) e^(y)_{t-1} y_t,      e^(y)_t = e^(y)_{t-1} + x~'_t y_t
    x'_t      = x~'_t / s_{t-1} - (1 - alpha_b) e^(1)_{t-1}, e^(1)_t = e^(1)_{t-1} + x'_t

with ``e^(y)_0 = e^(1)_0 = 0``; ``x'_t`` is the gradient passed to the linear layer below.
(Substituting the first equation into its update gives ``e^(y)_t ~ alpha_b e^(y)_{t-1} +
y'_t y_t`` while ``y_t^2 ~ 1``: a decaying average of the gradient's projection on ``y``.)

``eps = eps_ls = 1e-5`` (the authors' reference implementation's values; the paper's equations
have no epsilon). The reference implementation's C version divides by the already updated
``s_t`` in the backward; the paper's equation 12a and this module use ``s_{t-1}``, the scale the
forward pass divided by. Its later default of activation clamping instead of layer scaling
(2020, after the paper) is not used here. Decays: the loss-of-plasticity paper does not state
its values; the defaults are the authors' recommended ``alpha_f = 0.999``, ``alpha_b = 0.99``.

Evaluation (:meth:`OnlineNorm.infer`) normalizes with the current statistics ``mu_t``,
``sigma^2_t`` and changes no state. Gain and bias are trained by the caller with the network's
optimizer (:meth:`OnlineNorm.sgd_`). All state is ``[S, n]`` per layer; nothing is random, so
seed ``s`` of a stack computes what it computes alone.

At batch 1 on the CPU each of forward, backward and update is one numba loop over the
``[S, n]`` state (:mod:`ppo_cbp.nets.kernels`' compilation settings): as some thirty small tensor
operations per layer they cost more than the rest of a width-100 training step. Elsewhere
(other devices, minibatches, evaluation) the same equations run as tensor operations.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import torch
from torch import Tensor

from ppo_cbp.nets import kernels

__all__ = ["EPS", "EPS_LAYER_SCALING", "OnlineNorm"]

EPS = 1e-5
"""Added to the running variance under the square root."""
EPS_LAYER_SCALING = 1e-5
"""Added to the mean square of layer scaling."""


@numba.njit(cache=True, nogil=True, fastmath=kernels._FAST)
def _forward(x, mean, var, gain, bias, af, y, scale, z, r):  # pragma: no cover
    S, n = mean.shape
    for s in range(S):
        total = 0.0
        for i in range(n):
            sc = math.sqrt(var[s, i] + EPS)
            d = x[s, i] - mean[s, i]
            yi = d / sc
            y[s, i] = yi
            scale[s, i] = sc
            mean[s, i] += (1.0 - af) * d
            var[s, i] = af * var[s, i] + af * (1.0 - af) * d * d
            a = gain[s, i] * yi + bias[s, i]
            z[s, i] = a
            total += a * a
        rs = math.sqrt(total / n + EPS_LAYER_SCALING)
        r[s] = rs
        for i in range(n):
            z[s, i] /= rs


@numba.njit(cache=True, nogil=True, fastmath=kernels._FAST)
def _backward(
    grad, y, scale, z, r, gain, err_y, err_1, c, out, grad_gain, grad_bias
):  # pragma: no cover
    S, n = y.shape
    for s in range(S):
        dot = 0.0
        for i in range(n):
            dot += grad[s, i] * z[s, i]
        m = dot / n
        rs = r[s]
        for i in range(n):
            ga = (grad[s, i] - m * z[s, i]) / rs
            yi = y[s, i]
            grad_gain[s, i] = ga * yi
            grad_bias[s, i] = ga
            g = gain[s, i] * ga - c * err_y[s, i] * yi
            err_y[s, i] += g * yi
            xp = g / scale[s, i] - c * err_1[s, i]
            err_1[s, i] += xp
            out[s, i] = xp


@numba.njit(cache=True, nogil=True, fastmath=kernels._FAST)
def _sgd(gain, bias, grad_gain, grad_bias, beta, alpha):  # pragma: no cover
    S, n = gain.shape
    for s in range(S):
        for i in range(n):
            gain[s, i] = beta * gain[s, i] + alpha * grad_gain[s, i]
            bias[s, i] = beta * bias[s, i] + alpha * grad_bias[s, i]


def use_kernels(*tensors: Tensor) -> bool:
    """Whether the batch-1 numba path runs on these tensors (CPU, float32 or float64)."""
    return kernels.available(*tensors)


class OnlineNorm:
    """Online Normalization of ``n`` features for S stacked networks (inputs ``[S, B, n]``).

    :param num_seeds: S.
    :param features: n.
    :param alpha_f: forward decay of the running mean and variance, in (0, 1).
    :param alpha_b: decay of the backward control processes, in (0, 1).
    :param device: of all state tensors.
    :param dtype: of all state tensors.
    """

    def __init__(
        self,
        num_seeds: int,
        features: int,
        *,
        alpha_f: float = 0.999,
        alpha_b: float = 0.99,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        for name, value in (("alpha_f", alpha_f), ("alpha_b", alpha_b)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        self.alpha_f = float(alpha_f)
        self.alpha_b = float(alpha_b)
        shape = (num_seeds, features)
        kw = dict(device=device, dtype=dtype)
        self.mean = torch.zeros(shape, **kw)
        """Running mean ``mu`` ``[S, n]``."""
        self.var = torch.ones(shape, **kw)
        """Running variance ``sigma^2`` ``[S, n]``."""
        self.err_y = torch.zeros(shape, **kw)
        """Control process ``e^(y)`` (gradient along ``y``) ``[S, n]``."""
        self.err_1 = torch.zeros(shape, **kw)
        """Control process ``e^(1)`` (gradient along the 1-vector) ``[S, n]``."""
        self.gain = torch.ones(shape, **kw)
        """Learned gain ``gamma`` ``[S, n]``."""
        self.bias = torch.zeros(shape, **kw)
        """Learned bias ``beta`` ``[S, n]``."""
        self.grad_gain: Tensor | None = None
        """``dL/dgamma`` of the last :meth:`backward`, summed over its examples ``[S, n]``."""
        self.grad_bias: Tensor | None = None
        """``dL/dbeta`` of the last :meth:`backward` ``[S, n]``."""
        self._cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._kernel_step = False  # whether the last forward ran the kernels
        self._buffers: list[Tensor] = []  # batch 1: y, scale, z, x' [S, 1, n]; r [S]; gamma', beta'
        self._np: dict[str, Any] = {}  # [S, n] / [S] arrays of the state and buffers, made once

    def _kernel_arrays(self, x: Tensor) -> dict[str, Any]:
        if not self._np:
            self._buffers = [torch.empty_like(x) for _ in range(4)] + [x.new_empty(x.shape[0])]
            self._buffers += [torch.empty_like(self.gain), torch.empty_like(self.gain)]
            names = ("mean", "var", "err_y", "err_1", "gain", "bias")
            self._np = {k: kernels.as_array(getattr(self, k)) for k in names}
            buffers = ("y", "scale", "z", "out", "r", "grad_gain", "grad_bias")
            for k, t in zip(buffers, self._buffers):
                self._np[k] = kernels.as_array(t[:, 0] if t.dim() == 3 else t)
        return self._np

    def _scale(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Affine map and layer scaling: ``(z, r)``."""
        a = torch.addcmul(self.bias.unsqueeze(1), self.gain.unsqueeze(1), y)
        r = a.square().mean(-1, keepdim=True).add_(EPS_LAYER_SCALING).sqrt_()
        return a.div_(r), r

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Training forward of ``x`` ``[S, B, n]``: returns ``z``, updates ``mu`` and ``sigma^2``
        once per example, and keeps what :meth:`backward` needs. At batch 1 on the CPU ``z``
        is a buffer of this layer that the next call overwrites."""
        af = self.alpha_f
        self._kernel_step = x.shape[1] == 1 and use_kernels(x, self.mean)
        if self._kernel_step:
            a = self._kernel_arrays(x)
            _forward(
                kernels.as_array(x)[:, 0],
                a["mean"],
                a["var"],
                a["gain"],
                a["bias"],
                af,
                a["y"],
                a["scale"],
                a["z"],
                a["r"],
            )
            y, scale, z, _, r = self._buffers[:5]
            self._cache = (y, scale, z, r)
            return z
        y = torch.empty_like(x)
        scale = torch.empty_like(x)
        for b in range(x.shape[1]):
            d = x[:, b] - self.mean
            torch.add(self.var, EPS, out=scale[:, b]).sqrt_()
            torch.div(d, scale[:, b], out=y[:, b])
            self.mean.add_(d, alpha=1.0 - af)
            self.var.mul_(af).addcmul_(d, d, value=af * (1.0 - af))
        z, r = self._scale(y)
        self._cache = (y, scale, z, r)
        return z

    @torch.no_grad()
    def infer(self, x: Tensor) -> Tensor:
        """``z`` for ``x`` ``[S, B, n]`` with the current statistics; changes no state."""
        y = (x - self.mean.unsqueeze(1)) / (self.var + EPS).sqrt_().unsqueeze(1)
        return self._scale(y)[0]

    @torch.no_grad()
    def backward(self, grad: Tensor) -> Tensor:
        """``dL/dx`` ``[S, B, n]`` from ``grad = dL/dz`` of the last :meth:`__call__`; sets
        :attr:`grad_gain` and :attr:`grad_bias` (summed over the B examples) and advances the
        control processes once per example, in order. (At batch 1 on the CPU the result is a
        buffer of this layer, as in :meth:`__call__`.)"""
        if self._cache is None:
            raise RuntimeError("backward without a forward")
        y, scale, z, r = self._cache
        self._cache = None
        c = 1.0 - self.alpha_b
        if self._kernel_step:
            a = self._np
            _backward(
                kernels.as_array(grad.contiguous())[:, 0],
                a["y"],
                a["scale"],
                a["z"],
                a["r"],
                a["gain"],
                a["err_y"],
                a["err_1"],
                c,
                a["out"],
                a["grad_gain"],
                a["grad_bias"],
            )
            self.grad_gain, self.grad_bias = self._buffers[5:]
            return self._buffers[3]
        ga = (grad * z).sum(-1, keepdim=True).div_(-z.shape[-1])
        ga = torch.addcmul(grad, ga, z).div_(r)  # a'
        self.grad_gain = (ga * y).sum(1)
        self.grad_bias = ga.sum(1)
        gy = ga.mul_(self.gain.unsqueeze(1))  # y'
        out = torch.empty_like(gy)
        for b in range(gy.shape[1]):
            yb = y[:, b]
            g = torch.addcmul(gy[:, b], self.err_y, yb, value=-c)  # x~'
            self.err_y.addcmul_(g, yb)
            xb = out[:, b]
            torch.div(g, scale[:, b], out=xb).sub_(self.err_1, alpha=c)
            self.err_1.add_(xb)
        return out

    @torch.no_grad()
    def sgd_(self, beta: float, alpha: float) -> None:
        """``p <- beta p + alpha grad`` for gain and bias (SGD: ``beta = 1 - lr wd``,
        ``alpha = -lr``), with the gradients of the last :meth:`backward`."""
        if self._kernel_step:
            a = self._np
            _sgd(a["gain"], a["bias"], a["grad_gain"], a["grad_bias"], beta, alpha)
            return
        self.gain.mul_(beta).add_(self.grad_gain, alpha=alpha)
        self.bias.mul_(beta).add_(self.grad_bias, alpha=alpha)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: getattr(self, name).clone()
            for name in ("mean", "var", "err_y", "err_1", "gain", "bias")
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("mean", "var", "err_y", "err_1", "gain", "bias"):
            getattr(self, name).copy_(state[name])
