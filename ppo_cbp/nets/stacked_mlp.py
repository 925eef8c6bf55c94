"""S independent MLPs trained in lockstep as stacked weights ``[S, out, in + 1]``, without autograd.

The supervised benchmarks train one example per step (batch 1). At that size a step of a
PyTorch module is dominated by per-operation overhead (autograd graph, gradient tensors,
optimizer loops); stacking S seeds turns every matrix-vector product into one batched
``bmm`` and amortises that overhead over the seeds. The gradient is never materialised for
SGD: the update of layer ``l`` is one in-place rank-B update

    W_l <- (1 - lr * wd) * W_l - lr * delta_l^T h_{l-1}            (``baddbmm_``)

which reads and writes the weights once (the memory-bound part at width 2000). On CPU at batch
1 with SGD, the backward product ``delta_l W_l`` (with the old weights), the update and the
magnitudes ``sum |W_l|`` over rows and over columns that continual backprop's utility needs
are all computed in one pass over ``W_l`` (:func:`ppo_cbp.nets.kernels.sgd_backward_update_`), so
the utility costs no extra read of the weights: :attr:`StackedTrainer.magnitudes`.

Layout. Layer ``l`` is one tensor ``P_l`` of shape ``[S, n_out, n_in + 1]`` whose last column
is the bias, and the input of every layer carries a trailing constant 1: ``z = h_aug @ P^T``.
Weight and bias are therefore updated by the same operation. :meth:`StackedMLP.weight` and
:meth:`StackedMLP.bias` are views into ``P_l``, and :meth:`StackedMLP.unit_layers` describes
the hidden layers to the core's :class:`~ppo_cbp.plasticity.cbp.ContinualBackprop` and
:class:`~ppo_cbp.plasticity.redo.ReDo` with those views, so the operators write into the trained tensors.

Losses (means over the B examples of a step, as ``torch.nn.functional``):

* ``"cross_entropy"``: ``L = -log softmax(z)_y``, ``dL/dz = softmax(z) - onehot(y)``;
* ``"squared_error"``: ``L = (z - y)^2`` averaged also over the outputs (``F.mse_loss``),
  ``dL/dz = 2 (z - y) / n_out``.

Optimizers, all in place on ``P`` (weights and biases alike, as ``torch.optim`` does):

* SGD with coupled L2 weight decay ``wd``: ``w <- w - lr (g + wd w)`` (computed as
  ``(1 - lr wd) w - lr g``; the two differ by float rounding only);
* Adam (Kingma and Ba) with coupled L2: ``g <- g + wd w``, ``m <- b1 m + (1 - b1) g``,
  ``v <- b2 v + (1 - b2) g^2``, ``w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``
  (``torch.optim.Adam``'s formula);
* Shrink & Perturb: after the step, ``w <- w + noise_std * N(0, 1)`` for every parameter.

Online normalization (``norm_decays``): every hidden layer's pre-activation passes through a
:class:`~ppo_cbp.nets.online_norm.OnlineNorm` before the activation, ``h_l = f(N_l(z_l))``; its
backward sits between the activation's derivative and the linear layer's update, and its gain
and bias take the same SGD step as the weights.

LayerNorm (``layer_norm``): every hidden pre-activation passes through ``nn.LayerNorm``'s
function before the activation, ``y = gain * (z - mu) / sqrt(sigma^2 + eps) + offset`` with the
mean and biased variance over the layer's units and eps 1e-5; its gain and offset are one
``[S, 2, units]`` tensor per layer (:attr:`StackedMLP.norm_params`), stepped like the weights
(SGD with coupled L2 in the trainer's pass, or the caller's optimizer with ``gradients``). Its
backward, ``dz = rstd (g - mean(g) - xhat mean(g xhat))`` with ``g = dL/dy * gain``, sits
between the activation's derivative and the linear layer's.

Paired activations (``paired``): CReLU ``[relu(y_i), relu(-y_i)]`` or DFF ``[sin y_i, cos y_i]``
(:mod:`ppo_cbp.nets.crelu`, :mod:`ppo_cbp.nets.dff`), interleaved per unit, so every consumer
takes ``2 * units`` inputs (drawn with that fan-in). The features go to the next layer (and to
dropout); CBP and ReDo take each unit's activation, the mean magnitude of its two outputs.

At batch 1 on CPU LayerNorm and the paired activations are numba kernels, one call per layer
and direction (:mod:`ppo_cbp.nets.kernels`); otherwise tensor operations
(``native_layer_norm`` and its backward, as autograd computes them).

Dropout with probability ``p`` multiplies each hidden feature by ``mask / (1 - p)`` with
``mask ~ Bernoulli(1 - p)`` (inverted dropout, as ``nn.Dropout`` in training mode).

Per-seed randomness. Every random draw (initial weights, dropout masks, perturbation noise)
comes from a generator of that seed, drawn in the same pieces whatever the number of seeds
stacked, so seed ``s`` of a stack follows exactly the trajectory it follows alone. Dropout
masks are drawn for :attr:`StackedTrainer.dropout_chunk` steps at once per seed, which keeps
the per-seed loop out of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ppo_cbp.init import sample_
from ppo_cbp.nets import kernels
from ppo_cbp.nets.activations import (
    ACTIVATIONS,
    activate,
    activation_backward_,
)
from ppo_cbp.nets.crelu import CReLU
from ppo_cbp.nets.dff import DFF
from ppo_cbp.nets.online_norm import OnlineNorm
from ppo_cbp.nets.units import UnitLayer
from ppo_cbp.seeding import TAG_DROPOUT, TAG_INIT, TAG_NOISE, derive_seed

if TYPE_CHECKING:
    from ppo_cbp.nets.frozen_head import FrozenHead

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "OPTIMIZERS",
    "PAIRED",
    "StackedMLP",
    "StackedTrainer",
]

LOSSES = ("cross_entropy", "squared_error")
OPTIMIZERS = ("sgd", "adam")

PAIRED = {"crelu": CReLU, "dff": DFF}
"""The paired activations: two outputs per unit (:mod:`ppo_cbp.nets.crelu`, :mod:`ppo_cbp.nets.dff`)."""

LAYER_NORM_EPS = 1e-5
"""``nn.LayerNorm``'s default epsilon."""


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


class StackedMLP:
    """S multilayer perceptrons ``sizes[0] - sizes[1] - ... - sizes[-1]`` stacked along dim 0.

    :param sizes: layer widths, input first, output last (at least two entries).
    :param seeds: one seed per network; network ``s`` is initialised from a generator seeded
        with ``derive_seed(seeds[s], TAG_INIT)``, layer by layer, so it equals the
        network built alone from that seed.
    :param activation: hidden nonlinearity, one of :data:`ACTIVATIONS`.
    :param init: weight scheme of :mod:`ppo_cbp.init` (paper: Kaiming-uniform); the hidden layers
        use the activation's gain, the output layer gain 1 (it is linear). Biases are 0.
    :param norm_decays: ``(alpha_f, alpha_b)``: put an :class:`~ppo_cbp.nets.online_norm.OnlineNorm`
        after every hidden linear layer, before the activation (:attr:`norms`).
    :param layer_norm: put a LayerNorm (``nn.LayerNorm`` over the layer's units, eps 1e-5,
        gain 1 and offset 0 at initialisation; :meth:`layer_norms`) after every hidden linear
        layer, before the activation.
    :param paired: ``"crelu"`` or ``"dff"``: that paired activation (two outputs per unit,
        interleaved, :data:`PAIRED`) in every hidden layer instead of ``activation`` (which
        must then be ``"relu"``, whose gain the weights are drawn with); each consumer takes
        twice the units as inputs, so its fan-in (and its draw) is doubled, as
        :func:`~ppo_cbp.benchmarks.autograd_learner.build_mlp` draws it.
    :param device: of all tensors.
    :param dtype: of all tensors.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        seeds: Sequence[int],
        *,
        activation: str = "relu",
        init: str = "kaiming_uniform",
        norm_decays: tuple[float, float] | None = None,
        layer_norm: bool = False,
        paired: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        _check_choice("activation", activation, ACTIVATIONS)
        if paired is not None:
            _check_choice("paired activation", paired, tuple(PAIRED))
            if activation != "relu":
                raise ValueError(f"{paired} replaces relu, not {activation}")
        if norm_decays is not None and layer_norm:
            raise ValueError(
                "online normalization and LayerNorm normalise the same pre-activations"
            )
        sizes = [int(n) for n in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be >= 2 positive widths, got {sizes}")
        if len(seeds) < 1:
            raise ValueError("seeds is empty")
        self.sizes = sizes
        self.seeds = [int(s) for s in seeds]
        self.activation = activation
        self.init = init
        self.device = torch.device(device)
        self.dtype = dtype
        self.paired = paired
        S = len(self.seeds)
        k = self.features_per_unit
        fan_ins = [sizes[0], *(k * n for n in sizes[1:-1])]
        self.params: list[Tensor] = [
            torch.zeros(S, n_out, n_in + 1, device=self.device, dtype=dtype)
            for n_in, n_out in zip(fan_ins, sizes[1:])
        ]
        gain_of = [
            "linear" if activation == "linear" else activation for _ in range(self.num_hidden)
        ] + ["linear"]
        for s, seed in enumerate(self.seeds):
            g = torch.Generator(device=self.device).manual_seed(derive_seed(seed, TAG_INIT))
            for layer, p in enumerate(self.params):
                sample_(p[s, :, :-1], init, gain_of[layer], generator=g)
        self._weights = [p[..., :-1] for p in self.params]
        self._biases = [p[..., -1] for p in self.params]
        self.norms: list[OnlineNorm] = []
        if norm_decays is not None:
            alpha_f, alpha_b = norm_decays
            self.norms = [
                OnlineNorm(S, n, alpha_f=alpha_f, alpha_b=alpha_b, device=self.device, dtype=dtype)
                for n in sizes[1:-1]
            ]
        self.norm_params: list[Tensor] = []
        """Per hidden layer with ``layer_norm``, its LayerNorm's gain and offset as one
        ``[S, 2, units]`` tensor (gain ``[:, 0]``, offset ``[:, 1]``): one tensor to step,
        perturb and checkpoint, laid out as one seed's gain then offset."""
        for n in sizes[1:-1] if layer_norm else []:
            t = torch.zeros(S, 2, n, device=self.device, dtype=dtype)
            t[:, 0] = 1.0
            self.norm_params.append(t)
        self._layer_norms = [(t[:, 0], t[:, 1]) for t in self.norm_params]
        self.frozen_head: FrozenHead | None = None
        """A frozen MLP on the input of a layer, added to the output (plasticity injection's
        frozen heads, :mod:`ppo_cbp.nets.frozen_head`); the trainer runs it too."""

    @property
    def features_per_unit(self) -> int:
        """Features each hidden unit hands the next layer: 2 with a paired activation, else 1."""
        return 1 if self.paired is None else 2

    def layer_norms(self) -> list[tuple[Tensor, Tensor]]:
        """Per hidden layer its LayerNorm's gain and offset ``[S, units]``, views of
        :attr:`norm_params` (the same objects at every call; empty without LayerNorm)."""
        return list(self._layer_norms)

    def parameters(self) -> list[Tensor]:
        """Every trained tensor, in the order of one seed's ``build_mlp(...).parameters()``:
        per layer the weight and bias views, then the LayerNorm's gain and offset."""
        out: list[Tensor] = []
        for i in range(len(self.params)):
            out += [self.weight(i), self.bias(i)]
            if i < len(self._layer_norms):
                out += list(self._layer_norms[i])
        return out

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    @property
    def num_hidden(self) -> int:
        return len(self.sizes) - 2

    def weight(self, layer: int) -> Tensor:
        """View of layer ``layer``'s weights ``[S, n_out, n_in]`` (the same object at every call,
        so that an optimizer's state and the methods' records keyed by it agree)."""
        return self._weights[layer]

    def bias(self, layer: int) -> Tensor:
        """View of layer ``layer``'s bias ``[S, n_out]`` (the same object at every call)."""
        return self._biases[layer]

    def weights(self) -> list[Tensor]:
        return [self.weight(i) for i in range(len(self.params))]

    def unit_layers(self) -> list[UnitLayer]:
        """The hidden layers as :class:`~ppo_cbp.nets.units.UnitLayer` views for CBP and ReDo."""
        nonlinearity = "linear" if self.activation == "linear" else self.activation
        k = self.features_per_unit
        norms = self._layer_norms
        return [
            UnitLayer(
                self.weight(i),
                self.bias(i),
                out_weight=self.weight(i + 1),
                out_group=k,
                out_bias=self.bias(i + 1),
                averaged_outputs=k,
                # a replaced unit's LayerNorm entries restart at their initial gain 1, offset 0
                norm=[(norms[i][0], 1.0), (norms[i][1], 0.0)] if norms else [],
                init=self.init,
                nonlinearity=nonlinearity,
                seed_dims=1,
                name=f"hidden{i + 1}",
            )
            for i in range(self.num_hidden)
        ]

    def with_ones(self, x: Tensor) -> Tensor:
        """``[S, B, n]`` inputs with the trailing constant-1 column: ``[S, B, n + 1]``."""
        ones = torch.ones(*x.shape[:-1], 1, device=x.device, dtype=x.dtype)
        return torch.cat([x, ones], dim=-1)

    @property
    def outputs_per_unit(self) -> list[int]:
        """Per hidden layer, the features of each unit in :meth:`forward`'s hidden activations:
        2 with a paired activation, else 1 (the metrics' interface of the stacked networks)."""
        return [self.features_per_unit] * self.num_hidden

    def layer_norm(self, layer: int, z: Tensor) -> Tensor:
        """Hidden layer ``layer``'s LayerNorm of ``z`` (``[S, B, units]``), as the autograd
        learner's stacked network computes it."""
        gain, offset = self._layer_norms[layer]
        xhat = F.layer_norm(z, z.shape[-1:], None, None, LAYER_NORM_EPS)
        return torch.addcmul(offset.unsqueeze(1), xhat, gain.unsqueeze(1))

    @torch.no_grad()
    def forward(self, x_aug: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Outputs ``[S, B, n_out]`` and per hidden layer the features the next layer reads,
        ``[S, B, units]`` (``[S, B, 2 * units]`` after a paired activation: unit ``i``'s two
        outputs at ``2i, 2i + 1``) (no dropout; online normalization with its current
        statistics, which it does not update).

        ``x_aug``: ``[S, B, n_in + 1]`` inputs whose last column is 1 (:meth:`with_ones`).

        With a :attr:`frozen_head`, its output is added and its hidden features (those of its
        first head) replace those of the layer it spans.
        """
        h = x_aug
        hidden = []
        k = self.features_per_unit
        frozen = self.frozen_head
        phi = x_aug
        for layer in range(self.num_hidden):
            if frozen is not None and layer == frozen.cut:
                phi = h
            p = self.params[layer]
            nxt = torch.empty(*h.shape[:-1], k * p.shape[1] + 1, device=h.device, dtype=h.dtype)
            nxt[..., -1] = 1.0
            z = torch.bmm(h, p.transpose(1, 2))
            if self.norms:
                z = self.norms[layer].infer(z)
            if self._layer_norms:
                z = self.layer_norm(layer, z)
            if self.paired is not None:
                nxt[..., :-1] = PAIRED[self.paired]()(z)
            else:
                activate(self.activation, z, nxt[..., :-1])
            hidden.append(nxt[..., :-1])
            h = nxt
        if frozen is not None and frozen.cut == self.num_hidden:
            phi = h
        out = torch.bmm(h, self.params[-1].transpose(1, 2))
        if frozen is not None:
            extra, features = frozen.forward(phi)
            out.add_(extra)
            if features is not None:  # the frozen head's features in its layer's place
                hidden[frozen.cut] = features
        return out, hidden

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "params": [p.clone() for p in self.params],
            "norms": [n.state_dict() for n in self.norms],
        }
        if self.norm_params:
            state["layer_norms"] = [t.clone() for t in self.norm_params]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.params, state["params"], strict=True):
            dst.copy_(src)
        for norm, src in zip(self.norms, state.get("norms", []), strict=True):
            norm.load_state_dict(src)
        for dst, src in zip(self.norm_params, state.get("layer_norms", []), strict=True):
            dst.copy_(src)


class StackedTrainer:
    """Fused forward, backward and in-place update of a :class:`StackedMLP`.

    :param net: the stacked networks.
    :param loss: ``"cross_entropy"`` (integer targets ``[S, B]``) or ``"squared_error"``
        (targets ``[S, B, n_out]``).
    :param optimizer: ``"sgd"`` or ``"adam"``.
    :param lr: step size (> 0).
    :param weight_decay: coupled L2 coefficient ``wd`` (>= 0).
    :param betas: Adam's.
    :param eps: Adam's.
    :param noise_std: Shrink & Perturb's noise standard deviation (>= 0; 0 = off).
    :param dropout: dropout probability of the hidden units, in [0, 1).
    :param dropout_chunk: steps of dropout masks drawn at once per seed.
    :param gradients: compute each step's gradient into :attr:`grads` and leave the update to
        the caller (an optimizer over the weight and bias views, regularisers that add to the
        gradient first; then :meth:`perturb_` for the noise): ``optimizer``, ``lr``,
        ``weight_decay`` and Adam's settings are then not used.
    """

    def __init__(
        self,
        net: StackedMLP,
        *,
        loss: str = "cross_entropy",
        optimizer: str = "sgd",
        lr: float = 0.003,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        noise_std: float = 0.0,
        dropout: float = 0.0,
        dropout_chunk: int = 1024,
        gradients: bool = False,
    ):
        _check_choice("loss", loss, LOSSES)
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or eps <= 0:
            raise ValueError(f"Adam needs betas in [0, 1) and eps > 0, got {betas}, {eps}")
        if net.norms and (optimizer != "sgd" or noise_std > 0 or gradients):
            raise ValueError("online normalization is trained with plain SGD (no Adam, no noise)")
        if (net.norm_params or net.paired) and optimizer != "sgd" and not gradients:
            raise ValueError("LayerNorm and paired activations take SGD or the caller's optimizer")
        self.net = net
        self.loss = loss
        self.optimizer = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.noise_std = float(noise_std)
        self.dropout = float(dropout)
        self.dropout_chunk = int(dropout_chunk)
        self.steps = 0
        self.gradients = bool(gradients)
        self.grads = [torch.zeros_like(p) for p in net.params] if gradients else []
        """With ``gradients``: after each step, the gradient of every layer's ``P = [W | b]``."""
        self.norm_grads = [torch.zeros_like(t) for t in net.norm_params] if gradients else []
        """With ``gradients``: the gradient of every LayerNorm's ``[S, 2, units]`` gain and offset."""
        dev, dt = net.device, net.dtype
        if gradients:
            optimizer = "sgd"  # no state of its own: the caller's optimizer updates
        self.exp_avg = [torch.zeros_like(p) for p in net.params] if optimizer == "adam" else []
        self.exp_avg_sq = [torch.zeros_like(p) for p in net.params] if optimizer == "adam" else []
        self._state_views: dict[int, list[Tensor]] = {}
        self._layers: list[UnitLayer] | None = None
        self._hidden_total = net.features_per_unit * sum(net.sizes[1:-1])
        self.dropout_generators = [
            torch.Generator(device=dev).manual_seed(derive_seed(s, TAG_DROPOUT)) for s in net.seeds
        ]
        self.noise_generators = [
            torch.Generator(device=dev).manual_seed(derive_seed(s, TAG_NOISE)) for s in net.seeds
        ]
        self._uniform: Tensor | None = None
        self._uniform_pos = 0
        self._noise = (
            torch.empty(
                net.num_seeds,
                sum(p[0].numel() for p in [*net.params, *net.norm_params]),
                device=dev,
                dtype=dt,
            )
            if self.noise_std > 0
            else None
        )
        self._buffers: dict[int, list[Tensor]] = {}
        self._hidden_views: dict[int, list[Tensor]] = {}
        self._cpu = kernels.available(*net.params)
        self._fused = optimizer == "sgd" and self._cpu and not gradients
        self._arrays = kernels.ArrayViews()  # of the parameters and the fused buffers
        self._z: list[Tensor] = []  # batch-1 pre-activations, kept across steps
        self._own_rows: dict[int, np.ndarray] = {}  # [S, n] rows of the batch-1 buffers
        self._fused_buffers: list[tuple[Tensor, Tensor, Tensor]] = []
        self._param_index = {id(p): i for i, p in enumerate(net.params)}  # P -> its layer
        self._pulls: dict[int, Tensor] = {}  # layer -> the target its fused update pulls toward
        self._pull_coefficient = 0.0
        self._pulled = False  # whether the last step applied those pulls
        self._units: dict[int, list[Tensor]] = {}  # per batch, paired units' activations
        self._saved: list[tuple[Tensor, ...]] = []  # per hidden layer, what its backward reads
        self._arch_rows: list[dict[str, Tensor]] = []  # batch-1 buffers of the hidden layers
        self.magnitudes: list[tuple[Tensor, Tensor]] | None = None
        """After a fused step (CPU, SGD, batch 1, no perturbation), per hidden layer the sums
        ``(sum_k |w_out[k, i]|, sum_j |w_in[i, j]|)`` over the updated weights, ``[S, units]``
        each, for :meth:`ppo_cbp.plasticity.cbp.ContinualBackprop.step`; else None."""

    # ----------------------------------------------------------------------------------------
    def unit_layers(self) -> list[UnitLayer]:
        """The network's hidden layers (built once, so the Adam state lookup finds them)."""
        if self._layers is None:
            self._layers = self.net.unit_layers()
            if self.optimizer == "adam":
                for i, layer in enumerate(self._layers):
                    m, v = self.exp_avg[i], self.exp_avg_sq[i]
                    nm, nv = self.exp_avg[i + 1], self.exp_avg_sq[i + 1]
                    self._state_views[id(layer.weight)] = [m[..., :-1], v[..., :-1]]
                    self._state_views[id(layer.bias)] = [m[..., -1], v[..., -1]]
                    self._state_views[id(layer.out_weight)] = [nm[..., :-1], nv[..., :-1]]
        return self._layers

    def state_tensors(self, param: Tensor) -> list[Tensor]:
        """Adam's ``[m, v]`` for a tensor of :meth:`unit_layers` (empty for SGD)."""
        return self._state_views.get(id(param), [])

    def _hidden_buffers(self, batch: int) -> list[Tensor]:
        """Per hidden layer, ``[S, B, units + 1]`` activations whose last column is 1."""
        bufs = self._buffers.get(batch)
        if bufs is None:
            net = self.net
            bufs = []
            k = net.features_per_unit
            for units in net.sizes[1:-1]:
                b = torch.empty(
                    net.num_seeds, batch, k * units + 1, device=net.device, dtype=net.dtype
                )
                b[..., -1] = 1.0
                bufs.append(b)
            self._buffers[batch] = bufs
            # the same view objects every step, so that consumers can keep derived views
            self._hidden_views[batch] = [b[..., :-1] for b in bufs]
            if net.paired is not None:  # CBP and ReDo read each unit's activation
                self._units[batch] = [
                    b.new_empty(net.num_seeds, batch, units)
                    for b, units in zip(bufs, net.sizes[1:-1])
                ]
                self._hidden_views[batch] = list(self._units[batch])
            if batch == 1 and self._cpu:
                self._own_rows.update((id(b), kernels.as_array(b[:, 0])) for b in bufs)
                for u in self._units.get(batch, []):
                    self._own_rows[id(u)] = kernels.as_array(u[:, 0])
        return bufs

    def new_segment(self) -> None:
        """Discard the pre-drawn dropout masks (the next step draws fresh ones).

        Called at task boundaries so that the masks of a task depend only on the generator
        states at its start, which the checkpoint saves.
        """
        self._uniform = None
        self._uniform_pos = 0

    def _dropout_keep(self, batch: int) -> Tensor:
        """``[S, B, hidden_total]`` scaled keep-masks ``1[u >= p] / (1 - p)`` for one step."""
        if self._uniform is None or self._uniform_pos + batch > self._uniform.shape[1]:
            net = self.net
            rows = max(self.dropout_chunk, batch)
            u = torch.empty(
                net.num_seeds, rows, self._hidden_total, device=net.device, dtype=net.dtype
            )
            for s, g in enumerate(self.dropout_generators):
                torch.rand(rows, self._hidden_total, generator=g, out=u[s])
            self._uniform = (u >= self.dropout).to(net.dtype).div_(1.0 - self.dropout)
            self._uniform_pos = 0
        keep = self._uniform[:, self._uniform_pos : self._uniform_pos + batch]
        self._uniform_pos += batch
        return keep

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, x_aug: Tensor, target: Tensor, out: Tensor | None = None) -> list[Tensor]:
        """One training step on ``x_aug`` (``[S, B, n_in + 1]``, last column 1).

        The network's output *before* the update is written to ``out`` (``[S, B, n_out]``,
        may be a view into a larger buffer) when given: online accuracy and error are
        measured on it. Returns the hidden activations ``[S, B, units]`` (after the
        nonlinearity, before dropout), which CBP and ReDo take.
        """
        net = self.net
        act = net.activation
        params = net.params
        batch = x_aug.shape[1]
        n_hidden = net.num_hidden
        bufs = self._hidden_buffers(batch)
        keep = self._dropout_keep(batch) if self.dropout > 0 else None

        norms = net.norms
        # forward
        inputs = [x_aug]  # input of each layer, with its ones column
        pre: list[Tensor | None] = []
        masks: list[Tensor | None] = []
        offset = 0
        h = x_aug
        for layer in range(n_hidden):
            z = self._linear(layer, h)
            if norms:
                z = norms[layer](z)
            buf = bufs[layer]
            hidden = buf[..., :-1]
            if net.norm_params or net.paired is not None:
                z = self._hidden_forward(layer, z, buf)
                pre.append(z)
            else:
                activate(act, z, hidden)
                pre.append(z if act not in ("relu", "tanh", "sigmoid", "linear") else None)
            if keep is not None:
                units = hidden.shape[-1]
                mask = keep[..., offset : offset + units]
                offset += units
                # dropout is applied on a copy: CBP and ReDo see the activations before it
                dropped = torch.empty_like(buf)
                dropped[..., -1] = 1.0
                torch.mul(hidden, mask, out=dropped[..., :-1])
                masks.append(mask)
                h = dropped
            else:
                masks.append(None)
                h = buf
            inputs.append(h)
        out = self._linear(n_hidden, h, out)
        frozen = net.frozen_head
        if frozen is not None:
            out.add_(frozen.forward(inputs[frozen.cut], for_backward=frozen.cut > 0)[0])

        # dL/dz of the output (mean over the batch)
        if self.loss == "cross_entropy":
            delta = torch.softmax(out, dim=-1)
            delta.scatter_add_(
                2,
                target.view(*target.shape, 1),
                torch.full((1, 1, 1), -1.0, device=delta.device, dtype=delta.dtype).expand(
                    *target.shape, 1
                ),
            )
            if batch > 1:
                delta.div_(batch)
        else:
            delta = torch.sub(out, target).mul_(2.0 / (batch * out.shape[-1]))

        # backward and update, last layer first; delta of the layer below uses the old weights
        self.steps += 1
        fused = self._fused and batch == 1
        by_kernel = self._cpu and batch == 1 and (fused or self.gradients)
        if by_kernel and not self._fused_buffers:
            self._fused_buffers = [
                (p.new_empty(S, n_in), p.new_empty(S, n_in), p.new_empty(S, n_out))
                for p in params
                for S, n_out, n_in in [(p.shape[0], p.shape[1], p.shape[2] - 1)]
            ]
        beta, alpha = 1.0 - self.lr * self.weight_decay, -self.lr
        delta_out = delta
        for layer in range(n_hidden, -1, -1):
            p = params[layer]
            if self.gradients and by_kernel:
                below_buf = self._fused_buffers[layer][0]
                kernels.backward_gradient_(
                    self._arrays(p),
                    self._rows(delta),
                    self._rows(inputs[layer]),
                    self._arrays(below_buf) if layer > 0 else None,
                    self._arrays(self.grads[layer]),
                )
                below = below_buf.unsqueeze(1) if layer > 0 else None
            elif self.gradients:
                below = torch.bmm(delta, p[..., :-1]) if layer > 0 else None
                torch.bmm(delta.transpose(1, 2), inputs[layer], out=self.grads[layer])
            elif fused:
                grad_in, out_abs, in_abs = map(self._arrays, self._fused_buffers[layer])
                pull = self._pulls.get(layer)
                kernels.sgd_backward_update_(
                    self._arrays(p),
                    self._rows(delta),
                    self._rows(inputs[layer]),
                    beta,
                    alpha,
                    grad_in if layer > 0 else None,
                    out_abs if layer > 0 else None,
                    in_abs,
                    None if pull is None else self._arrays(pull),
                    self._pull_coefficient,
                )
                below = self._fused_buffers[layer][0].unsqueeze(1) if layer > 0 else None
            else:
                below = torch.bmm(delta, p[..., :-1]) if layer > 0 else None
                if self.optimizer == "sgd":
                    p.baddbmm_(delta.transpose(1, 2), inputs[layer], beta=beta, alpha=alpha)
                else:
                    self._adam_(layer, torch.bmm(delta.transpose(1, 2), inputs[layer]))
            if below is not None:
                if frozen is not None and layer == frozen.cut:  # phi's gradient through F
                    below.add_(frozen.backward(delta_out))
                if masks[layer - 1] is not None:
                    below.mul_(masks[layer - 1])
                if net.norm_params or net.paired is not None:
                    below = self._hidden_backward(layer - 1, below, pre[layer - 1], beta, alpha)
                else:
                    below = activation_backward_(
                        act, below, pre[layer - 1], bufs[layer - 1][..., :-1]
                    )
                if norms:
                    below = norms[layer - 1].backward(below)
                    norms[layer - 1].sgd_(beta, alpha)
            delta = below
        self._pulled = fused
        self.magnitudes = None
        if self._noise is not None:
            if not self.gradients:  # else the caller's update comes first
                self.perturb_()
        elif fused and net.paired is None:  # a paired unit's outgoing magnitude spans 2 columns
            b = self._fused_buffers
            self.magnitudes = [(b[i + 1][1], b[i][2]) for i in range(n_hidden)]
        return list(self._hidden_views[batch])

    def _batch1_buffers(self, layer: int) -> dict[str, Tensor]:
        """Hidden layer ``layer``'s batch-1 buffers of the architectural kernels (made once,
        their arrays remembered in :attr:`_own_rows`)."""
        if not self._arch_rows:
            net = self.net
            for units in net.sizes[1:-1]:
                bufs = {
                    name: torch.empty(net.num_seeds, 1, units, device=net.device, dtype=net.dtype)
                    for name in ("y", "xhat", "dy", "dz")
                }
                bufs["rstd"] = torch.empty(net.num_seeds, device=net.device, dtype=net.dtype)
                self._own_rows.update(
                    (id(t), kernels.as_array(t[:, 0])) for t in bufs.values() if t.dim() == 3
                )
                self._arch_rows.append(bufs)
        return self._arch_rows[layer]

    def _hidden_forward(self, layer: int, z: Tensor, buf: Tensor) -> Tensor:
        """Hidden layer ``layer`` after its linear part ``z`` (``[S, B, units]``): the LayerNorm
        ``y = gain * (z - mu) / sqrt(sigma^2 + eps) + offset`` (if any, else ``y = z``), then the
        activation of ``y`` into ``buf`` (its features; a paired unit's activation also into the
        units buffer). Returns ``y``; what the backward needs is kept in :attr:`_saved`."""
        net = self.net
        batch = z.shape[1]
        kernel = self._cpu and batch == 1
        if len(self._saved) < net.num_hidden:
            self._saved = [()] * net.num_hidden
        y = z
        if net.norm_params:
            norm = net.norm_params[layer]
            if kernel:
                rows = self._batch1_buffers(layer)
                y = rows["y"]
                kernels.layer_norm_forward_(
                    self._rows(z),
                    self._arrays(norm),
                    LAYER_NORM_EPS,
                    self._rows(rows["xhat"]),
                    self._arrays(rows["rstd"]),
                    self._rows(y),
                )
                self._saved[layer] = (z, rows["xhat"], None, rows["rstd"])
            else:
                xhat, mean, rstd = torch.native_layer_norm(
                    z, z.shape[-1:], None, None, LAYER_NORM_EPS
                )
                self._saved[layer] = (z, xhat, mean, rstd)
                y = torch.addcmul(norm[:, 1:2], xhat, norm[:, 0:1])
        if net.paired is None:
            activate(net.activation, y, buf[..., :-1])
            return y
        units = self._units[batch][layer]
        if kernel:
            kernels.paired_forward_(self._rows(y), self._rows(buf), self._rows(units), net.paired)
        else:
            act = PAIRED[net.paired]
            features = buf[..., :-1]
            features.copy_(act()(y))
            units.copy_(act.unit_activation(features))
        return y

    def _hidden_backward(
        self, layer: int, grad: Tensor, y: Tensor, beta: float, alpha: float
    ) -> Tensor:
        """``dL/dz`` of hidden layer ``layer`` from ``grad = dL/dfeatures`` (after dropout's
        mask): through the activation, then the LayerNorm, whose gain and offset get their
        gradient (into :attr:`norm_grads` with ``gradients``, else SGD's step ``norm <- beta
        norm + alpha grad`` after the gain was read)."""
        net = self.net
        batch = grad.shape[1]
        kernel = self._cpu and batch == 1
        if net.paired is None:
            dy = activation_backward_(
                net.activation, grad, y, self._buffers[batch][layer][..., :-1]
            )
        elif kernel:
            dy = self._batch1_buffers(layer)["dy"]
            kernels.paired_backward_(self._rows(grad), self._rows(y), self._rows(dy), net.paired)
        else:
            d = grad.unflatten(-1, (-1, 2))
            if net.paired == "crelu":
                dy = torch.where(y > 0, d[..., 0], 0.0) - torch.where(y < 0, d[..., 1], 0.0)
            else:
                dy = d[..., 0] * torch.cos(y) - d[..., 1] * torch.sin(y)
        if not net.norm_params:
            return dy
        norm = net.norm_params[layer]
        z, xhat, mean, rstd = self._saved[layer]
        grads = self.norm_grads[layer] if self.gradients else None
        if kernel:
            dz = self._batch1_buffers(layer)["dz"]
            kernels.layer_norm_backward_(
                self._rows(dy),
                self._rows(xhat),
                self._arrays(rstd),
                self._arrays(norm),
                self._rows(dz),
                None if grads is None else self._arrays(grads),
                beta,
                alpha,
            )
            return dz
        gain = norm[:, 0:1]
        dz = torch.ops.aten.native_layer_norm_backward(
            dy * gain, z, z.shape[-1:], mean, rstd, None, None, [True, False, False]
        )[0]
        grad_norm = torch.stack(((dy * xhat).sum(1), dy.sum(1)), dim=1)
        if grads is not None:
            grads.copy_(grad_norm)
        else:
            norm.mul_(beta).add_(grad_norm, alpha=alpha)
        return dz

    def _rows(self, h: Tensor) -> np.ndarray:
        """A batch-1 ``[S, 1, n]`` tensor as a C-contiguous ``[S, n]`` array for the kernels."""
        rows = self._own_rows.get(id(h))  # the trainer's buffers: views made once
        return rows if rows is not None else kernels.as_array(h[:, 0].contiguous())

    def _linear(self, layer: int, h: Tensor, out: Tensor | None = None) -> Tensor:
        """``h @ P_layer^T`` (``[S, B, n_out]``, into ``out`` if given)."""
        p = self.net.params[layer]
        if not (self._cpu and h.shape[1] == 1):
            return torch.bmm(h, p.transpose(1, 2), out=out)
        if not self._z:
            self._z = [q.new_empty(q.shape[0], 1, q.shape[1]) for q in self.net.params]
            self._own_rows.update((id(z), kernels.as_array(z[:, 0])) for z in self._z)
        z = self._z[layer]
        kernels.matvec_(self._arrays(p), self._rows(h), self._rows(z))
        if out is None:
            return z
        out.copy_(z)
        return out

    def _adam_(self, layer: int, grad: Tensor) -> None:
        p, m, v = self.net.params[layer], self.exp_avg[layer], self.exp_avg_sq[layer]
        b1, b2 = self.betas
        if self.weight_decay:
            grad.add_(p, alpha=self.weight_decay)
        m.lerp_(grad, 1.0 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        t = self.steps
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        denom = v.sqrt().div_(bc2**0.5).add_(self.eps)
        p.addcdiv_(m, denom, value=-self.lr / bc1)

    @torch.no_grad()
    def update_(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``gradients``: one step of ``optimizer`` over the weight and bias views
        ``[weight(0), bias(0), weight(1), ...]`` whose gradients are :attr:`grads`.

        On CPU, plain SGD (with coupled weight decay) runs as one kernel pass per layer over
        ``P`` and its gradient (:func:`~ppo_cbp.nets.kernels.sgd_apply_`), which also leaves
        :attr:`magnitudes`; any other optimizer is ``optimizer.step()``.
        """
        self.magnitudes = None
        groups = optimizer.param_groups
        g = groups[0]
        plain = (
            self._cpu
            and len(groups) == 1
            and type(optimizer) is torch.optim.SGD
            and not any(g.get(k) for k in ("maximize", "nesterov", "momentum"))
            and self._fused_buffers
        )
        params = self.net.params
        if plain:
            beta, alpha = 1.0 - g["lr"] * g["weight_decay"], -g["lr"]
            buffers = self._fused_buffers
            for layer, p in enumerate(params):
                _, out_abs, in_abs = buffers[layer]
                kernels.sgd_apply_(
                    self._arrays(p),
                    self._arrays(self.grads[layer]),
                    beta,
                    alpha,
                    self._arrays(out_abs) if layer > 0 else None,
                    self._arrays(in_abs),
                )
            for t, grad in zip(self.net.norm_params, self.norm_grads):
                t.mul_(beta).add_(grad, alpha=alpha)
            if self.net.paired is None:  # a paired unit's outgoing magnitude spans 2 columns
                self.magnitudes = [
                    (buffers[i + 1][1], buffers[i][2]) for i in range(self.net.num_hidden)
                ]
            return
        if not self._adam_by_kernel(optimizer):
            optimizer.step()

    def fold_pull(
        self, params: Sequence[Tensor], targets: Sequence[Tensor], coefficient: float
    ) -> None:
        """Let the next fused step (CPU, SGD, batch 1) apply :meth:`pull_` of the layers'
        ``P`` among ``params`` in its update pass: :meth:`pull_` then leaves them after such a
        step. Given before each step, as the targets may be other tensors after a resume."""
        index = self._param_index
        self._pulls = {index[id(p)]: t for p, t in zip(params, targets) if id(p) in index}
        self._pull_coefficient = coefficient

    @torch.no_grad()
    def pull_(
        self, params: Sequence[Tensor], targets: Sequence[Tensor], coefficient: float
    ) -> None:
        """``p <- p + coefficient * target`` for each parameter (L2-Init's pull toward the
        initial parameters, folded into SGD). For a layer's ``P`` after a kernel step, one
        kernel pass that also renews :attr:`magnitudes` of the weights it leaves, or nothing
        where the step has done it (:meth:`fold_pull`)."""
        index = self._param_index
        kernel = self.magnitudes is not None
        for p, target in zip(params, targets, strict=True):
            layer = index.get(id(p))
            if layer is not None and self._pulled and layer in self._pulls:
                continue
            if layer is None or not kernel:
                p.add_(target, alpha=coefficient)
                continue
            _, out_abs, in_abs = self._fused_buffers[layer]
            kernels.sgd_apply_(
                self._arrays(p),
                self._arrays(target),
                1.0,
                coefficient,
                self._arrays(out_abs) if layer > 0 else None,
                self._arrays(in_abs),
            )

    def _adam_by_kernel(self, optimizer: torch.optim.Optimizer) -> bool:
        """``torch.optim.Adam``'s step by :func:`~ppo_cbp.nets.kernels.adam_` on CPU, over
        contiguous parameters whose state exists (its first step creates it): whether it
        stepped."""
        if not self._cpu or type(optimizer) is not torch.optim.Adam:
            return False
        groups = optimizer.param_groups
        g = groups[0]
        flags = ("amsgrad", "maximize", "capturable", "differentiable", "fused", "foreach")
        if len(groups) != 1 or any(g.get(k) for k in flags) or g.get("decoupled_weight_decay"):
            return False
        state = optimizer.state
        params = g["params"]
        if not all(p in state and p.is_contiguous() and p.grad.is_contiguous() for p in params):
            return False
        for p in params:
            st = state[p]
            st["step"] += 1
            kernels.adam_(
                self._arrays(p),
                self._arrays(p.grad),
                self._arrays(st["exp_avg"]),
                self._arrays(st["exp_avg_sq"]),
                lr=g["lr"],
                betas=g["betas"],
                eps=g["eps"],
                weight_decay=g["weight_decay"],
                step=int(st["step"]),
            )
        return True

    def perturb_(self) -> None:
        """Shrink & Perturb's noise: ``P <- P + noise_std * N(0, 1)`` for every parameter, each
        seed's draw from its own generator (in :meth:`step` unless ``gradients``)."""
        if self._noise is None:
            return
        noise = self._noise
        for s, g in enumerate(self.noise_generators):
            torch.randn(noise.shape[1], generator=g, out=noise[s])
        offset = 0
        # the layers' [W | b], then the LayerNorms' gain and offset (PerturbNoise's layout)
        for p in [*self.net.params, *self.net.norm_params]:
            n = p[0].numel()
            p.add_(noise[:, offset : offset + n].view(p.shape), alpha=self.noise_std)
            offset += n

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and generator states; loadable with ``weights_only=True``."""
        return {
            "steps": self.steps,
            "exp_avg": [m.clone() for m in self.exp_avg],
            "exp_avg_sq": [v.clone() for v in self.exp_avg_sq],
            "dropout_generators": [g.get_state() for g in self.dropout_generators],
            "noise_generators": [g.get_state() for g in self.noise_generators],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for dst, src in zip(self.exp_avg, state["exp_avg"], strict=True):
            dst.copy_(src)
        for dst, src in zip(self.exp_avg_sq, state["exp_avg_sq"], strict=True):
            dst.copy_(src)
        for g, s in zip(self.dropout_generators, state["dropout_generators"], strict=True):
            g.set_state(s)
        for g, s in zip(self.noise_generators, state["noise_generators"], strict=True):
            g.set_state(s)
        self.new_segment()
