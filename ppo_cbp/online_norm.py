"""Online Normalization (Chiley et al., "Online Normalization for Training Neural Networks",
NeurIPS 2019) for S stacked layers, with its forward and backward written out by hand.

The loss-of-plasticity paper runs it on Online Permuted MNIST (Extended Data Fig. 4, green)
after every hidden linear layer, before the activation:

    h_l = f(OnlineNorm_l(W_l h_{l-1} + b_l))

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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["EPS", "EPS_LAYER_SCALING", "OnlineNorm"]

EPS = 1e-5
"""Added to the running variance under the square root."""
EPS_LAYER_SCALING = 1e-5
"""Added to the mean square of layer scaling."""


class OnlineNorm:
    """Online Normalization of ``n`` features for S stacked networks (inputs ``[S, B, n]``).

    Args:
        num_seeds: S.
        features: n.
        alpha_f: forward decay of the running mean and variance, in (0, 1).
        alpha_b: decay of the backward control processes, in (0, 1).
        device, dtype: of all state tensors.
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
        self.grad_bias: Tensor | None = None
        self._cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _scale(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Affine map and layer scaling: ``(z, r)``."""
        a = torch.addcmul(self.bias.unsqueeze(1), self.gain.unsqueeze(1), y)
        r = a.square().mean(-1, keepdim=True).add_(EPS_LAYER_SCALING).sqrt_()
        return a.div_(r), r

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Training forward of ``x`` ``[S, B, n]``: returns ``z``, updates ``mu`` and ``sigma^2``
        once per example, and keeps what :meth:`backward` needs."""
        af = self.alpha_f
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
        control processes once per example, in order."""
        if self._cache is None:
            raise RuntimeError("backward without a forward")
        y, scale, z, r = self._cache
        self._cache = None
        ga = (grad * z).sum(-1, keepdim=True).div_(-z.shape[-1])
        ga = torch.addcmul(grad, ga, z).div_(r)  # a'
        self.grad_gain = (ga * y).sum(1)
        self.grad_bias = ga.sum(1)
        gy = ga.mul_(self.gain.unsqueeze(1))  # y'
        c = 1.0 - self.alpha_b
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
