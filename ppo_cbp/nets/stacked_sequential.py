"""S copies of a small ``nn.Sequential`` network trained in lockstep as one stacked network.

On a GPU a small network's step costs what its kernel launches cost, whatever the batch, so S
seeds stacked into one network train S times as many images per launch. Every parameter of
:class:`StackedSequential` carries a leading seed dimension, and seed ``s``'s slice ``[s]``
holds exactly the tensor of its network alone:

* a Conv2d's weight ``[S, C_out, C_in, kh, kw]`` and bias ``[S, C_out]`` run as one grouped
  convolution (``groups=S``) on the seed-major channel layout ``[B, S * C, H, W]``: channel
  ``s * C + c`` is channel ``c`` of seed ``s``, and group ``s`` reads only seed ``s``'s
  channels, so ``weight.view(S * C_out, C_in, kh, kw)`` is the grouped kernel;
* a Linear's weight ``[S, out, in]`` and bias ``[S, out]`` run as one batched matmul
  ``z = b + h W^T`` on ``[S, B, in]``;
* elementwise activations and pooling act per channel and are applied as they are, and so is
  a :class:`~ppo_cbp.nets.crelu.CReLU` or :class:`~ppo_cbp.nets.dff.DFF` after a Linear
  (it doubles the last dimension);
* a LayerNorm after a Linear normalises each seed's own features (the last dimension of
  ``[S, B, n]``) and applies its gain and offset ``[S, n]`` per seed;
* a channel-major Flatten of ``[B, S * C, H, W]`` is ``view(B, S, C * H * W)`` with the seed
  moved first: each seed's features in the order of its own flatten.

The loss of the stacked network is the sum of the seeds' losses, so the gradient of seed
``s``'s slice is its own gradient, and any elementwise optimizer (``torch.optim.SGD`` with
momentum and weight decay) updates each slice exactly as it updates the network alone.

The hidden layers are :class:`~ppo_cbp.nets.units.UnitLayer` views with ``seed_dims=1`` of the
stacked parameters themselves (so the optimizer's state is found by parameter; a LayerNorm's
gain and offset are their ``norm`` entries), and :meth:`StackedSequential.forward` returns
their activations ``[S, B, C, H, W]`` or ``[S, B, units]`` for
:class:`~ppo_cbp.plasticity.cbp.ContinualBackprop` and :class:`~ppo_cbp.plasticity.redo.ReDo`
(for a CReLU or DFF unit, the mean magnitude of its two outputs, as
:func:`~ppo_cbp.nets.units.sequential_unit_layers` defines it). With ``features=True`` it
returns instead the features each hidden layer hands the next, for the metrics: a CReLU or DFF
layer's ``[S, B, 2 * units]`` outputs
(:attr:`StackedSequential.outputs_per_unit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppo_cbp.nets.units import PAIRED, UnitLayer, leaf_modules, sequential_unit_layers

__all__ = ["ELEMENTWISE", "StackedSequential"]

ELEMENTWISE = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.SELU,
    nn.Identity,
)
"""The elementwise activations a stacked network applies as they are (and that a head may hold)."""
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_STATELESS = (*ELEMENTWISE, *_POOLS, *PAIRED)
_PARAMETRISED = (nn.Conv2d, nn.Linear, nn.LayerNorm)


def _signature(m: nn.Module) -> tuple:
    """What must agree between the stacked networks' modules at one position."""
    shapes = tuple(tuple(p.shape) for p in m.parameters(recurse=False))
    return (type(m), repr(m), shapes)


class StackedSequential(nn.Module):
    """S networks of the same architecture as one network (see the module docstring).

    :param nets: the S networks, each an ``nn.Sequential`` (nested ones are flattened) of
        Conv2d (no groups or dilation, zero padding), Linear, elementwise activations,
        max or average pooling and ``Flatten()``, ending in a Linear; after a Linear also
        LayerNorm (over its features), CReLU and DFF. Their parameters are copied (stacked);
        the networks themselves are not kept.
    """

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        if not nets:
            raise ValueError("no networks to stack")
        leaves = [leaf_modules(net) for net in nets]
        first = leaves[0]
        for other in leaves[1:]:
            if [_signature(m) for m in other] != [_signature(m) for m in first]:
                raise ValueError("the stacked networks must have the same architecture")
        after_linear = False  # the features are then the last dimension of [S, B, n]
        for m in first:
            if isinstance(m, nn.Conv2d):
                if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros":
                    raise ValueError(f"unsupported convolution {m}")
            elif isinstance(m, nn.Flatten):
                if (m.start_dim, m.end_dim) != (1, -1):
                    raise ValueError(f"unsupported {m}: only Flatten() of whole examples")
            elif isinstance(m, (nn.LayerNorm, *PAIRED)):
                if not after_linear:
                    raise ValueError(f"{m} must follow a Linear layer in a stacked network")
                if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
                    raise ValueError(f"unsupported {m}: only a LayerNorm over the features")
            elif not isinstance(m, (nn.Linear, *ELEMENTWISE, *_POOLS)):
                raise ValueError(f"unsupported module {type(m).__name__} in a stacked network")
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Flatten, *_POOLS)):
                after_linear = isinstance(m, nn.Linear)
        if not isinstance(first[-1], nn.Linear):
            raise ValueError("the stacked networks must end in a Linear layer")
        self.num_seeds = len(nets)
        # the stateless modules of the first network run as they are
        self._stateless = [m if isinstance(m, _STATELESS) else None for m in first]
        self._kinds = [type(m) for m in first]
        self._norm_eps = [m.eps if isinstance(m, nn.LayerNorm) else None for m in first]
        self._conv_args = [
            (m.stride, m.padding) if isinstance(m, nn.Conv2d) else None for m in first
        ]
        # parameters in the order of the networks' own parameters(): weight, bias per layer
        self.params = nn.ParameterList()
        index: dict[int, int] = {}
        self._layer_params: list[tuple[int, int | None] | None] = []
        for i, m in enumerate(first):
            if not isinstance(m, _PARAMETRISED):
                self._layer_params.append(None)
                continue
            slots = []
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if p is None:
                    slots.append(None)
                    continue
                stacked = torch.stack([getattr(ls[i], name).detach() for ls in leaves])
                index[id(p)] = len(self.params)
                slots.append(len(self.params))
                self.params.append(nn.Parameter(stacked))
            self._layer_params.append((slots[0], slots[1]))
        if len(self.weights()) >= 2:
            units, taps = sequential_unit_layers(nets[0], "torch_default")
        else:
            units, taps = [], []
        self._taps = [next(i for i, m in enumerate(first) if m is t) for t in taps]
        self._per_unit_taps = {i for i in self._taps if self._kinds[i] in PAIRED}
        self._units = [
            (
                index[id(u.weight)],
                None if u.bias is None else index[id(u.bias)],
                index[id(u.out_weight)],
                None if u.out_bias is None else index[id(u.out_bias)],
                u.out_group,
                u.averaged_outputs,
                u.nonlinearity,
                [(index[id(t)], value) for t, value in u.norm],
            )
            for u in units
        ]

    @property
    def outputs_per_unit(self) -> list[int]:
        """Per hidden (unit) layer, the features each unit hands the next layer: 2 after a
        CReLU (its ``relu(z_i), relu(-z_i)``) or a DFF (its ``sin(z_i), cos(z_i)``), else 1."""
        return [2 if t in self._per_unit_taps else 1 for t in self._taps]

    def weights(self) -> list[Tensor]:
        """The weight of every Conv2d and Linear layer, ``[S, ...]`` each (biases excluded)."""
        return [
            self.params[slots[0]]
            for kind, slots in zip(self._kinds, self._layer_params)
            if kind in (nn.Conv2d, nn.Linear)
        ]

    def layer_norms(self) -> list[tuple[Tensor | None, Tensor | None]]:
        """The gain and offset ``[S, n]`` of every LayerNorm (None where it has none)."""
        p = self.params
        return [
            tuple(None if i is None else p[i] for i in slots)  # type: ignore[misc]
            for kind, slots in zip(self._kinds, self._layer_params)
            if kind is nn.LayerNorm
        ]

    def __len__(self) -> int:
        """The number of modules of each (flattened) network."""
        return len(self._kinds)

    def layer(
        self, i: int
    ) -> tuple[type[nn.Module], nn.Module | None, Tensor | None, Tensor | None]:
        """Module ``i`` of the flattened networks: its type, the module itself if it is an
        activation or pooling (else None), and the stacked weight and bias of a Conv2d or Linear
        (else None; a LayerNorm's gain and offset are :meth:`layer_norms`)."""
        slots = self._layer_params[i]
        if slots is None or self._kinds[i] not in (nn.Conv2d, nn.Linear):
            return self._kinds[i], self._stateless[i], None, None
        w, b = slots
        return self._kinds[i], None, self.params[w], None if b is None else self.params[b]

    def head(self) -> tuple[Tensor, Tensor | None]:
        """The output layer's weight ``[S, out, in]`` and bias ``[S, out]``."""
        w, b = self._layer_params[-1]
        return self.params[w], None if b is None else self.params[b]

    def unit_layers(self, init: str) -> list[UnitLayer]:
        """The hidden layers as seeded :class:`~ppo_cbp.nets.units.UnitLayer` of the stacked
        parameters; ``init`` is the scheme the networks were initialised with."""
        p = self.params

        def opt(i: int | None) -> Tensor | None:
            return None if i is None else p[i]

        return [
            UnitLayer(
                weight=p[w],
                bias=opt(b),
                out_weight=p[ow],
                out_group=group,
                out_bias=opt(ob),
                averaged_outputs=averaged,
                norm=[(p[t], value) for t, value in norm],
                init=init,
                nonlinearity=nonlinearity,
                seed_dims=1,
                name=f"layer{i}",
            )
            for i, (w, b, ow, ob, group, averaged, nonlinearity, norm) in enumerate(self._units)
        ]

    def forward(
        self, x: Tensor, start: int = 0, stop: int | None = None, *, features: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Outputs ``[S, B, out]`` and the hidden activations of every unit layer.

        ``x``: ``[B, S, *example]``, seed ``s``'s examples in ``x[:, s]`` (this layout makes
        the seed-major channels of the grouped convolutions a view). The hidden activations
        are ``[S, B, C, H, W]`` (conv) or ``[S, B, units]`` (Linear) views, detached: each
        unit's activation, for a CReLU or DFF unit the mean magnitude of its two outputs (what
        CBP and ReDo read). With ``features`` such a layer's are instead its outputs
        ``[S, B, 2 * units]``, the features the next layer reads (for the metrics; the other
        layers' are the same).

        ``start``, ``stop``: run modules ``start`` to ``stop - 1`` only, with the hidden
        activations tapped in that range: a network split in two (a body and a head) computes
        exactly what the whole does. The split must lie where activations are seed-first
        ``[S, B, features]`` (after the Flatten): ``forward(x, stop=k)`` returns them, and
        ``forward(h, start=k)`` takes them.
        """
        stop = len(self._kinds) if stop is None else stop
        if not 0 <= start <= stop <= len(self._kinds):
            raise ValueError(f"no modules {start} to {stop} in a network of {len(self)}")
        S, B = self.num_seeds, x.shape[0]
        if start:
            h, B = x, x.shape[1]
            seed_first = True
        elif x.dim() == 5:  # images: seed-major channels
            h = x.reshape(B, S * x.shape[2], *x.shape[3:])
            seed_first = False
        else:
            h = x.transpose(0, 1)
            seed_first = True
        hidden: list[Tensor] = []
        taps = iter(t for t in self._taps if t >= start)
        tap = next(taps, None)
        p = self.params
        for i in range(start, stop):
            kind = self._kinds[i]
            slots = self._layer_params[i]
            if kind is nn.Conv2d:
                w = p[slots[0]]
                bias = None if slots[1] is None else p[slots[1]].reshape(-1)
                stride, padding = self._conv_args[i]
                h = F.conv2d(h, w.view(-1, *w.shape[2:]), bias, stride, padding, groups=S)
            elif kind is nn.Linear:
                w = p[slots[0]].transpose(1, 2)
                if slots[1] is None:
                    h = torch.bmm(h, w)
                else:
                    h = torch.baddbmm(p[slots[1]].unsqueeze(1), h, w)
            elif kind is nn.LayerNorm:
                # seed-first [S, B, n]: each seed's gain and offset broadcast over its batch
                h = F.layer_norm(h, h.shape[-1:], None, None, self._norm_eps[i])
                gain, offset = (None if j is None else p[j].unsqueeze(1) for j in slots)
                if gain is not None and offset is not None:
                    h = torch.addcmul(offset, h, gain)
                elif gain is not None:
                    h = h * gain
                elif offset is not None:
                    h = h + offset
            elif kind is nn.Flatten:
                if not seed_first:
                    h = h.reshape(B, S, -1).transpose(0, 1)
                    seed_first = True
                else:
                    h = h.flatten(2)
            else:
                h = self._stateless[i](h)
            if i == tap:
                d = h.detach()
                if i in self._per_unit_taps and not features:
                    d = self._stateless[i].unit_activation(d)
                hidden.append(d if seed_first else d.view(B, S, -1, *d.shape[2:]).transpose(0, 1))
                tap = next(taps, None)
        if not seed_first:
            raise ValueError(f"a forward cannot stop at module {stop}, before the Flatten")
        return h, hidden
