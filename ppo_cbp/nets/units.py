"""Hidden units as the reinitialising operators see them.

A *unit* is one output row of a Linear layer or one output channel of a Conv2d layer. To
replace unit ``i`` the operators touch every place it appears:

* its incoming weights ``weight[i]`` (redrawn from the layer's initial distribution) and
  incoming bias ``bias[i]`` (set to 0);
* the per-unit parameters and statistics of a normalisation layer between the layer and its
  activation (BatchNorm/LayerNorm weight 1, bias 0, running mean 0, running variance 1);
* its outgoing weights in the consumer layer (set to 0): column ``i`` of a Linear consumer,
  input channel ``i`` of a Conv2d consumer, or the ``g`` consecutive columns
  ``i*g, ..., i*g + g - 1`` of a Linear consumer fed by a channel-major flatten of a conv
  output with ``g = H*W`` positions per channel, or by a CReLU with its ``g = 2`` outputs
  ``relu(z_i), relu(-z_i)`` per unit (:class:`~ppo_cbp.nets.crelu.CReLU`), or by a DFF with
  its ``sin(z_i), cos(z_i)`` (:class:`~ppo_cbp.nets.dff.DFF`);
* the optimizer state (Adam moments, SGD momentum, ...) of exactly those entries.

:class:`UnitLayer` names these tensors for one layer. Every tensor may carry a leading seed
dimension (``seed_dims=1``: ``weight`` is ``[S, out, in]``) for S independent networks trained
in lockstep; all operations are then applied per seed with no Python loop over seeds except
for drawing random numbers, which uses one generator per seed so that each seed's draws are
the same as if it ran alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ppo_cbp.init import check_scheme, distribution, fans, sample
from ppo_cbp.nets import kernels
from ppo_cbp.nets.crelu import CReLU
from ppo_cbp.nets.dff import DFF

PAIRED = (CReLU, DFF)
"""The activations with two outputs per unit (interleaved, unit ``i``'s at ``2i, 2i + 1``),
each with a ``unit_activation(output)``: the mean magnitude of the unit's outputs."""


def _abs_sum(h: Tensor) -> tuple[Tensor, int]:
    """(sum of |h| over all but the seed (0) and unit (2) dims of a seeded activation, count)."""
    dims = (1,) if h.dim() == 3 else (1, 3, 4)
    # abs().sum() is several times faster on CPU than linalg.vector_norm(ord=1)
    return h.abs().sum(dim=dims), h.numel() // (h.shape[0] * h.shape[2])


def _mean_abs(h: Tensor) -> Tensor:
    total, count = _abs_sum(h)
    return total.div_(count)


StateTensors = Callable[[Tensor], Iterable[Tensor]]
"""Maps a parameter to the optimizer-state tensors that share its shape."""


@dataclass(eq=False)
class UnitLayer:
    """The tensors that make up one layer of replaceable hidden units.

    :param weight: incoming weights, ``[*seed, units, fan_in]`` or ``[*seed, units, c_in, kh, kw]``.
    :param bias: incoming bias ``[*seed, units]`` or None.
    :param out_weight: the consumer's weights, ``[*seed, n_next, units * out_group]`` (Linear) or
        ``[*seed, n_next, units, kh, kw]`` (Conv2d). None for units with no weighted
        consumer: their utility then has no outgoing-magnitude factor.
    :param out_group: consumer columns per unit (``H*W`` after a channel-major flatten, 2 after a
        CReLU or a DFF, else 1).
    :param out_bias: the consumer's bias, used only when folding a replaced unit's mean output.
    :param averaged_outputs: how many distinct outputs the activation ``h`` of a unit is the mean
        (magnitude) of (2 for a CReLU or DFF unit, whose two outputs differ; else 1). A replaced unit's mean
        output cannot then be folded into ``out_bias`` column by column.
    :param norm: ``(tensor [*seed, units], value)`` pairs reset to ``value`` for replaced units.
    :param init: name of the scheme the layer was initialised with (see :mod:`ppo_cbp.init`).
    :param nonlinearity: the layer's activation, for the scheme's gain.
    :param seed_dims: 1 if every tensor has a leading seed dimension, else 0.
    :param name: for messages and logging.
    """

    weight: Tensor
    bias: Tensor | None = None
    out_weight: Tensor | None = None
    out_group: int = 1
    out_bias: Tensor | None = None
    averaged_outputs: int = 1
    norm: list[tuple[Tensor, float]] = field(default_factory=list)
    init: str = "kaiming_uniform"
    nonlinearity: str = "relu"
    seed_dims: int = 0
    name: str = ""
    _abs_out: Tensor | None = field(default=None, init=False, repr=False)
    _sums: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_scheme(self.init)
        if self.seed_dims not in (0, 1):
            raise ValueError(f"seed_dims must be 0 or 1, got {self.seed_dims}")
        if self.averaged_outputs < 1 or self.out_group % self.averaged_outputs:
            raise ValueError(
                f"{self.name}: averaged_outputs={self.averaged_outputs} must be a positive "
                f"divisor of out_group={self.out_group}"
            )
        units = self.units
        for t in [self.bias, *(t for t, _ in self.norm)]:
            if t is not None and tuple(t.shape) != (*self.seed_shape, units):
                raise ValueError(
                    f"{self.name}: per-unit tensor of shape {tuple(t.shape)}, expected {(*self.seed_shape, units)}"
                )
        if self.out_weight is not None:
            consumed = self.out_weight.shape[self.seed_dims + 1]
            if self.out_weight.dim() - self.seed_dims == 2:
                if consumed != units * self.out_group:
                    raise ValueError(
                        f"{self.name}: consumer takes {consumed} inputs, expected units x group = {units} x {self.out_group}"
                    )
            elif consumed != units or self.out_group != 1:
                raise ValueError(
                    f"{self.name}: conv consumer takes {consumed} channels, expected {units}"
                )

    @property
    def seed_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[: self.seed_dims])

    @property
    def num_seeds(self) -> int:
        return self.weight.shape[0] if self.seed_dims else 1

    @property
    def units(self) -> int:
        return self.weight.shape[self.seed_dims]

    @property
    def fan_in(self) -> int:
        return fans(self.weight.shape, self.seed_dims)[0]

    def seeded(self, t: Tensor) -> Tensor:
        """``t`` as a view with exactly one leading seed dimension."""
        return t if self.seed_dims else t.unsqueeze(0)

    def mean_abs(self, h: Tensor) -> Tensor:
        """E|h_i| per unit, over the batch (and spatial positions): ``[S, units]``."""
        return _mean_abs(self.seeded(h))

    def mean(self, h: Tensor) -> Tensor:
        """E[h_i] per unit: ``[S, units]``."""
        h = self.seeded(h)
        return h.mean(dim=(1,) if h.dim() == 3 else (1, 3, 4))

    def abs_sum(self, h: Tensor, center: Tensor | None = None) -> tuple[Tensor, int]:
        """(sum of |h_i - center_i| per unit over the batch and positions, number of terms).

        ``center`` is ``[S, units]`` or None (no centering); the sum is ``[S, units]``.
        """
        h = self.seeded(h)
        if center is not None:
            shape = (
                (h.shape[0], 1, self.units) if h.dim() == 3 else (h.shape[0], 1, self.units, 1, 1)
            )
            h = h - center.view(shape)
        return _abs_sum(h)

    def out_magnitude(self) -> Tensor | None:
        """Sum of |outgoing weights| per unit, ``[S, units]``; None without a consumer."""
        w = self.out_weight
        if w is None:
            return None
        S = self.num_seeds
        sums = self._sums
        if sums is None or sums[0] != w.data_ptr():
            sums = self._sums = self._sum_buffers(w)
        if sums[1] is not None:
            # one pass gives both sums; the row sums are the consumer's incoming magnitudes
            _, arrays, per_column, _ = sums
            kernels.abs_sums_(*arrays)
        else:
            flat = self.seeded(w).reshape(S, w.shape[self.seed_dims], -1)
            # |w| goes to a buffer kept across steps: cheaper than a fresh temporary every step
            if self._abs_out is None or self._abs_out.shape != w.shape:
                self._abs_out = torch.empty_like(w, memory_format=torch.contiguous_format)
            absolute = torch.abs(w, out=self._abs_out)
            per_column = self.seeded(absolute).reshape(flat.shape).sum(dim=1)
        group = per_column.shape[1] // self.units  # flattened positions or kernel taps
        return per_column if group == 1 else per_column.view(S, self.units, group).sum(-1)

    def _sum_buffers(self, w: Tensor) -> tuple:
        """(data pointer, kernel arrays, column sums, row sums) for :meth:`out_magnitude`."""
        flat = self.seeded(w).reshape(self.num_seeds, w.shape[self.seed_dims], -1)
        if not (kernels.available(w) and flat.is_contiguous()):
            return (w.data_ptr(), None, None, None)
        col = w.new_empty(self.num_seeds, flat.shape[2]).detach()
        row = w.new_empty(self.num_seeds, flat.shape[1]).detach()
        return (w.data_ptr(), tuple(map(kernels.as_array, (flat, col, row))), col, row)

    def in_magnitude(self, previous: UnitLayer | None = None) -> Tensor:
        """Mean of |incoming weights| per unit, ``[S, units]``.

        If ``previous`` is the layer whose consumer is this layer's weight and it computed
        :meth:`out_magnitude` this step, the sums of that pass are reused instead of reading
        the weights again.
        """
        w = self.weight
        same = (
            previous is not None
            and previous.out_weight is not None
            and previous.out_weight.data_ptr() == w.data_ptr()
            and previous.out_weight.shape == w.shape
            and previous.out_weight.stride() == w.stride()
        )
        if same and previous._sums is not None and previous._sums[3] is not None:
            return previous._sums[3] / self.fan_in
        absolute = previous._abs_out if same and previous._abs_out is not None else w.abs()
        return self.seeded(absolute).reshape(self.num_seeds, self.units, -1).mean(dim=-1)

    def fresh_weights(self, rows: int, generators: Sequence[torch.Generator]) -> Tensor:
        """``rows`` new incoming weight rows per seed from the layer's init: ``[S, rows, fan_in]``."""
        kind, scale = distribution(
            self.init, self.nonlinearity, *fans(self.weight.shape, self.seed_dims)
        )
        w = self.weight
        return torch.stack(
            [
                sample(
                    (rows, self.fan_in), kind, scale, generator=g, device=w.device, dtype=w.dtype
                )
                for g in generators
            ]
        )


class FlatUnits:
    """The units of several layers as one index space, for ops over a whole network at once.

    A per-unit quantity of every layer lives in one flat buffer of ``S * T`` entries (``S``
    networks, ``T`` units per network), layer after layer: layer ``l``'s block is a contiguous
    ``[S, units_l]`` view (:meth:`views`), so per-layer code and the CPU kernels see ordinary
    tensors while an update of the whole network is one elementwise op on the buffer.

    The reductions write into that layout with a number of ops that does not grow with the
    number of layers, except for one ``vector_norm`` per weight matrix:

    * :meth:`sums` and :meth:`abs_sums`: ``sum_b mean_p h`` and ``sum_b mean_p |h - c|`` per
      unit, the sum over the ``B`` examples of the minibatch and the mean over the ``P`` spatial
      positions of a conv channel (``P = 1`` for a Linear unit): one ``cat`` of the activations
      viewed as ``[*seed, B, n_l]``, one reduction over the batch, one segment mean over each
      channel's positions (only if some layer has ``P > 1``), one gather of ``c`` onto the
      positions (only if some layer has ``P > 1`` or ``S > 1``) and one permutation back to the
      layer-major layout (only if ``S > 1``: the concatenation is seed-major).
    * :meth:`out_sums` and :meth:`in_sums`: ``sum_k |w_out[k, i]|`` (every outgoing weight: all
      consumer units, kernel taps and flattened positions) and ``sum_j |w_in[i, j]|``: one
      ``vector_norm`` per layer written into the layer's block.
    """

    GATHER_LIMIT = 1 << 20
    """Most weight entries :meth:`in_sums` copies to reduce them in one op."""

    def __init__(self, layers: Sequence[UnitLayer]):
        self.layers = list(layers)
        self.num_seeds = self.layers[0].num_seeds
        self.seed_dims = self.layers[0].seed_dims
        if any(layer.seed_dims != self.seed_dims for layer in self.layers):
            raise ValueError("all layers must have the same seed dimensions")
        self.units = [layer.units for layer in self.layers]
        S = self.num_seeds
        self.starts = [S * sum(self.units[:i]) for i in range(len(self.units))]
        self.size = S * sum(self.units)
        self.device = self.layers[0].weight.device
        self._layout_key: tuple | None = None
        self._offsets: Tensor | None = None
        self._expand: Tensor | None = None
        self._permute: Tensor | None = None
        self._weight_args: dict[tuple[str, int], tuple] = {}
        self._rows: tuple | None = None

    def views(self, flat: Tensor) -> list[Tensor]:
        """Each layer's ``[S, units]`` block of a flat buffer."""
        S = self.num_seeds
        return [flat[a : a + S * u].view(S, u) for a, u in zip(self.starts, self.units)]

    def per_layer(self, values: Sequence[float], dtype: torch.dtype) -> Tensor:
        """A flat buffer holding ``values[l]`` in every entry of layer ``l``."""
        return torch.cat(
            [
                torch.full((self.num_seeds * u,), float(v), dtype=dtype, device=self.device)
                for v, u in zip(values, self.units)
            ]
        )

    # ----------------------------------------------------------------------------------------
    def batch_and_positions(self, hs: Sequence[Tensor]) -> tuple[int, list[int]]:
        """Minibatch size and spatial positions per unit of each layer's activations."""
        d = self.seed_dims
        batch = hs[0].shape[d]
        positions = []
        for layer, h in zip(self.layers, hs):
            if h.shape[d] != batch or h.shape[d + 1] != layer.units:
                raise ValueError(
                    f"{layer.name}: activations of shape {tuple(h.shape)}, expected "
                    f"[*seed, {batch}, {layer.units}, ...]"
                )
            positions.append(math.prod(h.shape[d + 2 :]))
        return batch, positions

    def _layout(self, hs: Sequence[Tensor]) -> None:
        """Index tensors for activations of these shapes (rebuilt only when the shapes change)."""
        key = tuple(tuple(h.shape) for h in hs)
        if key == self._layout_key:
            return
        _, positions = self.batch_and_positions(hs)
        S, T = self.num_seeds, sum(self.units)
        # storage index of every unit in seed-major order (the order of a concatenation)
        storage = torch.cat(
            [a + torch.arange(S * u).view(S, u) for a, u in zip(self.starts, self.units)],
            dim=1,
        )  # [S, T]
        per_position = torch.cat(
            [torch.full((u,), p, dtype=torch.int64) for u, p in zip(self.units, positions)]
        )
        self._offsets = self._expand = self._permute = None
        if any(p > 1 for p in positions):
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), per_position.cumsum(0)])
            if self.seed_dims:
                offsets = offsets.expand(S, T + 1).contiguous()
            self._offsets = offsets.to(self.device)
        if self._offsets is not None or S > 1:
            self._expand = (
                storage.repeat_interleave(per_position, dim=1).reshape(-1).to(self.device)
            )
        if S > 1:
            self._permute = torch.argsort(storage.reshape(-1)).to(self.device)
        self._layout_key = key

    def concat(self, hs: Sequence[Tensor]) -> Tensor:
        """The activations of all layers as one ``[*seed, B, N]`` tensor, for :meth:`sums`."""
        self._layout(hs)
        d = self.seed_dims
        # view, not reshape: one dispatch instead of two (reshape copies only if it must)
        flat = [
            h
            if h.dim() == d + 2
            else (h.view if h.is_contiguous() else h.reshape)(*h.shape[: d + 1], -1)
            for h in hs
        ]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    def _per_unit(self, per_position: Tensor) -> Tensor:
        """``[*seed, N]`` sums over the batch -> flat buffer of per-unit means over positions."""
        out = per_position
        if self._offsets is not None:
            out = torch.segment_reduce(out, "mean", offsets=self._offsets, axis=-1)
        if self.seed_dims:
            out = out.view(-1)
            if self._permute is not None:
                out = out.index_select(0, self._permute)
        return out

    def sums(self, x: Tensor) -> Tensor:
        """``sum_b mean_p h[b, i, p]`` for every unit of ``x = concat(hs)``: a flat buffer."""
        return self._per_unit(x.sum(-2))

    def abs_sums(self, x: Tensor, center: Tensor | None = None) -> Tensor:
        """``sum_b mean_p |h[b, i, p] - center[i]|`` for every unit (``center`` a flat buffer)."""
        if center is not None:
            if self._expand is not None:
                center = center.index_select(0, self._expand)
                if self.seed_dims:
                    center = center.view(self.num_seeds, 1, -1)
            x = x - center
        return self._per_unit(torch.linalg.vector_norm(x, 1, dim=-2))

    # ----------------------------------------------------------------------------------------
    def destinations(self, flat: Tensor) -> list[Tensor]:
        """Each layer's block of a flat buffer shaped as a reduction over its weights returns it."""
        return [v if self.seed_dims else v[0] for v in self.views(flat)]

    def _args(self, kind: str, i: int) -> tuple | None:
        """(weight view, reduced dims) for :meth:`out_sums`/:meth:`in_sums`, kept per weight."""
        layer = self.layers[i]
        w = layer.out_weight if kind == "out" else layer.weight
        if w is None:
            return None
        cached = self._weight_args.get((kind, i))
        if cached is not None and cached[0] == w.data_ptr():
            return cached[1:]
        d = layer.seed_dims
        if kind == "in":
            view, dims = w, tuple(range(d + 1, w.dim()))
        elif w.dim() - d == 2 and layer.out_group > 1:
            # channel-major flatten: unit i owns columns i*g .. i*g + g - 1
            view = w.reshape(*w.shape[: d + 1], layer.units, layer.out_group)
            dims = (d, d + 2)
            if view.data_ptr() != w.data_ptr() or not w.is_contiguous():
                return view, dims  # a copy: made again at every call
        else:
            view, dims = w, (d, *range(d + 2, w.dim()))
        self._weight_args[(kind, i)] = (w.data_ptr(), view, dims)
        return view, dims

    def out_sums(self, out: Sequence[Tensor]) -> None:
        """``out[l]`` (:meth:`destinations` of a flat buffer) <- ``sum_k |w_out[k, i]|`` for the
        layers with a consumer; the others are left as they are."""
        for i, dst in enumerate(out):
            args = self._args("out", i)
            if args is not None:
                torch.linalg.vector_norm(args[0], 1, dim=args[1], out=dst)

    def in_sums(self, out: Tensor, blocks: Sequence[Tensor]) -> Tensor:
        """``sum_j |w_in[i, j]|`` of every unit, a flat buffer.

        Small networks (incoming weights of at most :attr:`GATHER_LIMIT` entries in all, each
        contiguous): one ``cat`` of the weights, ``abs_`` and a segment sum over each unit's row,
        a new buffer. Otherwise one ``vector_norm`` per layer into ``blocks``
        (:meth:`destinations` of ``out``), and ``out`` is returned: copying large weights costs
        more memory traffic than the launches it saves.
        """
        weights = [layer.weight for layer in self.layers]
        key = tuple(w.data_ptr() for w in weights)
        if self._rows is None or self._rows[0] != key:
            rows = None
            if sum(w.numel() for w in weights) <= self.GATHER_LIMIT and all(
                w.is_contiguous() for w in weights
            ):
                lengths = torch.tensor(
                    [
                        layer.fan_in
                        for layer in self.layers
                        for _ in range(self.num_seeds * layer.units)
                    ]
                )
                offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
                rows = ([w.view(-1) for w in weights], offsets.to(self.device))
            self._rows = (key, rows)
        rows = self._rows[1]
        if rows is not None:
            return torch.segment_reduce(torch.cat(rows[0]).abs_(), "sum", offsets=rows[1])
        for i, dst in enumerate(blocks):
            view, dims = self._args("in", i)
            torch.linalg.vector_norm(view, 1, dim=dims, out=dst)
        return out


def _no_state(p: Tensor) -> list[Tensor]:
    return []


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer | StateTensors | None, reset: bool = True
) -> StateTensors:
    """The state tensors to zero for a parameter's replaced entries.

    For a torch optimizer: its per-parameter state shaped like the parameter (Adam moments,
    SGD momentum). A function is taken as is (for hand-written optimizers). None, or
    ``reset=False``: nothing is reset.
    """
    if optimizer is None or not reset:
        return _no_state
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer

    def tensors(p: Tensor) -> list[Tensor]:
        state = optimizer.state.get(p)
        if state is None:
            return [view_of(v, p) for v in state_of_base(optimizer, p).values()]
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]

    return tensors


def state_of_base(optimizer: torch.optim.Optimizer, p: Tensor) -> dict[str, Tensor]:
    """For ``p`` a view of a tensor that ``optimizer`` trains (a weight or bias view of the
    fused trainer's ``P = [W | b]``, which its optimizer steps whole): that tensor's state
    tensors shaped like it (moments; not the step count), else ``{}``."""
    base = p._base
    state = optimizer.state.get(base) if base is not None else None
    if not state:
        return {}
    return {
        k: v
        for k, v in state.items()
        if torch.is_tensor(v) and v.shape == base.shape and v.stride() == base.stride()
    }


def view_of(t: Tensor, p: Tensor) -> Tensor:
    """The part of ``t`` (laid out as ``p``'s base) that ``p`` views."""
    return t.as_strided(
        p.shape, p.stride(), t.storage_offset() + p.storage_offset() - p._base.storage_offset()
    )


@torch.no_grad()
def replace_units_(
    layer: UnitLayer,
    index: Tensor,
    generators: Sequence[torch.Generator],
    state_tensors: StateTensors = _no_state,
    mean_output: Tensor | None = None,
) -> None:
    """Replace the units ``index`` (``[S, k]``, per seed) of ``layer`` in place.

    Incoming weights are redrawn from the layer's init, incoming bias, outgoing weights and
    the optimizer state of all those entries are zeroed, normalisation entries reset. With
    ``mean_output`` (``[S, units]``, the units' mean activation), ``out_bias`` first absorbs
    ``sum_i W_out[:, i] * mean_output[i]`` so the consumer's expected input is unchanged
    (for conv consumers: ignoring zero padding at the borders).
    """
    S, k = index.shape
    units = layer.units
    if mean_output is not None and layer.averaged_outputs > 1:
        raise ValueError(
            f"{layer.name}: a unit's activation is the mean of its {layer.averaged_outputs} "
            "outputs (CReLU, DFF), which have different means: its mean output cannot be folded "
            "into the consumer's bias"
        )

    def rows_(t: Tensor, values: Tensor | float) -> None:
        flat = layer.seeded(t).view(S, units, -1)
        idx = index.unsqueeze(-1).expand(S, k, flat.shape[-1])
        if isinstance(values, Tensor):
            flat.scatter_(1, idx, values.view(S, k, -1))
        else:
            flat.scatter_(1, idx, values)

    rows_(layer.weight, layer.fresh_weights(k, generators))
    for s in state_tensors(layer.weight):
        rows_(s, 0.0)
    if layer.bias is not None:
        for t in (layer.bias, *state_tensors(layer.bias)):
            rows_(t, 0.0)
    for t, value in layer.norm:
        rows_(t, value)
        for s in state_tensors(t):
            rows_(s, 0.0)

    if layer.out_weight is None:
        return
    w = layer.seeded(layer.out_weight)
    n_next = w.shape[1]
    if w.dim() == 3:
        g = layer.out_group
        cols = (index.unsqueeze(-1) * g + torch.arange(g, device=index.device)).reshape(S, 1, k * g)
        cols = cols.expand(S, n_next, k * g)

        def columns_(t: Tensor) -> None:
            layer.seeded(t).scatter_(2, cols, 0.0)

        if mean_output is not None and layer.out_bias is not None:
            m = mean_output.gather(1, index).repeat_interleave(g, dim=1)
            layer.seeded(layer.out_bias).add_((w.gather(2, cols) * m.unsqueeze(1)).sum(-1))
    else:
        taps = w.shape[3] * w.shape[4]
        chans = index.view(S, 1, k, 1).expand(S, n_next, k, taps)

        def columns_(t: Tensor) -> None:
            layer.seeded(t).view(S, n_next, units, taps).scatter_(2, chans, 0.0)

        if mean_output is not None and layer.out_bias is not None:
            m = mean_output.gather(1, index)
            picked = w.reshape(S, n_next, units, taps).gather(2, chans).sum(-1)
            layer.seeded(layer.out_bias).add_((picked * m.unsqueeze(1)).sum(-1))
    columns_(layer.out_weight)
    for s in state_tensors(layer.out_weight):
        columns_(s)


@torch.no_grad()
def replace_masked_units_(
    layer: UnitLayer,
    mask: Tensor,
    generators: Sequence[torch.Generator],
    state_tensors: StateTensors = _no_state,
) -> None:
    """Replace the units where ``mask`` (``[S, units]`` bool) is set, as :func:`replace_units_`.

    A mask rather than indices keeps a data-dependent number of units free of host syncs.
    """
    S, units = mask.shape
    keep = (~mask).to(layer.weight.dtype)

    def rows_(t: Tensor, value: Tensor | float | None) -> None:
        flat = layer.seeded(t).view(S, units, -1)
        if value is None:
            flat.mul_(keep.unsqueeze(-1))
        else:
            flat.copy_(torch.where(mask.unsqueeze(-1), value, flat))

    rows_(layer.weight, layer.fresh_weights(units, generators))
    for s in state_tensors(layer.weight):
        rows_(s, None)
    if layer.bias is not None:
        for t in (layer.bias, *state_tensors(layer.bias)):
            rows_(t, None)
    for t, value in layer.norm:
        rows_(t, value)
        for s in state_tensors(t):
            rows_(s, None)

    if layer.out_weight is None:
        return
    w = layer.seeded(layer.out_weight)
    if w.dim() == 3:
        column_keep = keep.repeat_interleave(layer.out_group, dim=1).unsqueeze(1)
    else:
        column_keep = keep.view(S, 1, units, 1, 1)
    for t in (layer.out_weight, *state_tensors(layer.out_weight)):
        layer.seeded(t).mul_(column_keep)


# --------------------------------------------------------------------------------------------
# nn.Sequential networks: find the unit layers and record their activations with hooks
# --------------------------------------------------------------------------------------------

_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
_PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.Identity)
_NONLINEARITY = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.SiLU: "swish",
    nn.GELU: "gelu",
    nn.SELU: "selu",
    CReLU: "relu",
    DFF: "relu",  # dff_mlp draws its layers with ReLU's gain, as crelu_mlp (see its docstring)
}


def leaf_modules(net: nn.Module) -> list[nn.Module]:
    """The modules of an ``nn.Sequential``, nested ``nn.Sequential`` flattened, in forward order."""
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential network, got {type(net).__name__}")
    out: list[nn.Module] = []
    for m in net:
        out.extend(leaf_modules(m) if isinstance(m, nn.Sequential) else [m])
    return out


def norm_resets(norm: nn.Module) -> list[tuple[Tensor, float]]:
    """What to reset in a BatchNorm/LayerNorm for a replaced unit: weight 1, bias 0, running
    mean 0, running variance 1."""
    out: list[tuple[Tensor, float]] = []
    if getattr(norm, "weight", None) is not None:
        out.append((norm.weight, 1.0))
    if getattr(norm, "bias", None) is not None:  # LayerNorm(bias=False) has a gain only
        out.append((norm.bias, 0.0))
    if getattr(norm, "running_mean", None) is not None:
        out += [(norm.running_mean, 0.0), (norm.running_var, 1.0)]
    return out


def sequential_unit_layers(
    net: nn.Module, init: str, nonlinearity: str | None = None
) -> tuple[list[UnitLayer], list[nn.Module]]:
    """The hidden unit layers of ``net`` and, for each, the module whose output is ``h``.

    ``net`` is an ``nn.Sequential`` (nested Sequentials are flattened) of Linear/Conv2d layers,
    each optionally followed by a BatchNorm/LayerNorm, an activation module and pooling,
    flatten or dropout. ``h`` is what the consumer reads: the output of the activation, or of
    the pooling after it (before flatten and dropout); the activation's nonlinearity gives the
    init gain unless ``nonlinearity`` is given.

    A :class:`~ppo_cbp.nets.crelu.CReLU` or :class:`~ppo_cbp.nets.dff.DFF` between two
    Linear layers makes units of two outputs each: ``out_group=2`` (the consumer takes
    ``2 * units`` inputs), the ReLU gain, and ``h`` is the module's ``unit_activation`` of its
    output, the mean magnitude of each unit's two outputs (``|z| / 2`` for CReLU,
    ``(|sin z| + |cos z|) / 2`` for DFF; :class:`ActivationRecorder` maps the recorded output
    to it).
    """
    leaves = leaf_modules(net)
    positions = [i for i, m in enumerate(leaves) if isinstance(m, _WEIGHT_LAYERS)]
    if len(positions) < 2:
        raise ValueError("the network needs at least two Linear/Conv2d layers to have hidden units")
    layers, taps = [], []
    for a, b in zip(positions, positions[1:]):
        layer, consumer = leaves[a], leaves[b]
        between = leaves[a + 1 : b]
        norms = [m for m in between if isinstance(m, _NORMS)]
        acts = [m for m in between if not isinstance(m, (*_NORMS, *_PASS_THROUGH))]
        # h is what the consumer reads: after the activation and any pooling, before the
        # flatten (which would hide the channels) and dropout
        readable = [m for m in between if not isinstance(m, (nn.Flatten, nn.Dropout, nn.Identity))]
        tap = (readable or [layer])[-1]
        act_name = nonlinearity or (_NONLINEARITY.get(type(acts[-1]), "relu") if acts else "linear")
        group = averaged = 1
        paired = [m for m in between if isinstance(m, PAIRED)]
        if paired:
            _check_paired(type(paired[0]), layer, consumer, tap)
            group = averaged = paired[0].outputs_per_unit
        elif isinstance(layer, nn.Conv2d) and isinstance(consumer, nn.Linear):
            if consumer.in_features % layer.out_channels:
                raise ValueError(
                    f"{consumer} does not take a flatten of {layer.out_channels} channels"
                )
            group = consumer.in_features // layer.out_channels
        layers.append(
            UnitLayer(
                weight=layer.weight,
                bias=layer.bias,
                out_weight=consumer.weight,
                out_group=group,
                out_bias=consumer.bias,
                averaged_outputs=averaged,
                norm=[r for n in norms for r in norm_resets(n)],
                init=init,
                nonlinearity=act_name,
                name=f"layer{len(layers)}",
            )
        )
        taps.append(tap)
    if len(set(map(id, taps))) != len(taps):
        raise ValueError("each hidden layer needs its own activation module instance to be hooked")
    return layers, taps


def _check_paired(kind: type, layer: nn.Module, consumer: nn.Module, tap: nn.Module) -> None:
    """A CReLU's (or DFF's) units are those of a Linear layer read by a Linear consumer of twice
    the width."""
    name = kind.__name__
    if not (isinstance(layer, nn.Linear) and isinstance(consumer, nn.Linear)):
        raise ValueError(f"a {name} must sit between two Linear layers, not after {layer}")
    if not isinstance(tap, kind):
        raise ValueError(
            f"nothing but dropout may follow the {name} after {layer}: the consumer must read "
            "its outputs"
        )
    if consumer.in_features != kind.outputs_per_unit * layer.out_features:
        raise ValueError(
            f"{consumer} must take {kind.outputs_per_unit * layer.out_features} inputs, the two "
            f"outputs of each of the {layer.out_features} {name} units"
        )


class ActivationRecorder:
    """Forward hooks that keep the latest output of each given module (no copy, no op).

    The outputs are kept as they are (still attached to the autograd graph, which the backward
    pass frees): a ``detach`` per layer would add an op to every forward pass. Read them under
    ``torch.no_grad()``, as the operators do. A module with a ``unit_activation(output)`` method
    (:class:`~ppo_cbp.nets.crelu.CReLU`, :class:`~ppo_cbp.nets.dff.DFF`) has several outputs
    per unit: :meth:`latest`
    gives that method's per-unit activation of its recorded output, computed when read, so
    that forward passes nobody reads (acting steps) cost nothing more.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.outputs: list[Tensor | None] = [None] * len(modules)
        self._per_unit = [getattr(m, "unit_activation", None) for m in modules]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.outputs[i] = output

        return hook

    def latest(self) -> list[Tensor]:
        if any(o is None for o in self.outputs):
            raise RuntimeError(
                "no activations recorded yet: run a forward pass of the network first"
            )
        if not any(self._per_unit):
            return self.outputs  # type: ignore[return-value]
        return [
            o if f is None else f(o.detach())  # type: ignore[union-attr]
            for o, f in zip(self.outputs, self._per_unit)
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def hidden_activations(net: nn.Sequential, x: Tensor) -> list[Tensor]:
    """The activation output ``h`` of every hidden layer of ``net`` on input ``x``: each unit's
    activation as the operators see it (for a CReLU unit the mean of its two outputs,
    ``|z| / 2``; for a DFF unit ``(|sin z| + |cos z|) / 2``; :func:`hidden_features` gives the
    outputs themselves)."""
    _, taps = sequential_unit_layers(net, "kaiming_uniform")
    recorder = ActivationRecorder(taps)
    try:
        net(x)
        return list(recorder.latest())
    finally:
        recorder.remove()


@torch.no_grad()
def hidden_features(net: nn.Sequential, x: Tensor) -> list[tuple[Tensor, int]]:
    """The features every hidden layer of ``net`` hands its consumer on input ``x``, with the
    number of features per unit: ``(features, outputs_per_unit)`` per hidden layer.

    The features are the recorded output of the layer's tap (:func:`sequential_unit_layers`),
    detached: what the next layer reads. For a ReLU (or any elementwise) layer they are the
    activations ``[..., units]`` of :func:`hidden_activations` and ``outputs_per_unit`` is 1; after
    a :class:`~ppo_cbp.nets.crelu.CReLU` they are its ``[..., 2 * units]`` outputs
    ``relu(z_i), relu(-z_i)`` (unit ``i``'s at columns ``2i, 2i + 1``; after a
    :class:`~ppo_cbp.nets.dff.DFF` its ``sin(z_i), cos(z_i)``) and ``outputs_per_unit`` is 2.
    One forward pass; the per-unit activations are the module's ``unit_activation`` of them.
    """
    layers, taps = sequential_unit_layers(net, "kaiming_uniform")
    recorder = ActivationRecorder(taps)
    try:
        net(x)
        return [
            (o.detach(), u.averaged_outputs)  # type: ignore[union-attr]
            for o, u in zip(recorder.outputs, layers, strict=True)
        ]
    finally:
        recorder.remove()
