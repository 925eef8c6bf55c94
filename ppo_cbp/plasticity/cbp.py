"""Continual backpropagation (Dohare et al., Nature 2024, Algorithm 1).

After every optimizer step, in every hidden layer ``l``:

1. ages grow: ``a_l += 1``;
2. utilities are updated (below);
3. the count of units to replace grows by the replacement rate times the number of eligible
   units, ``c_l += rho * n_eligible`` where a unit is eligible when its age exceeds the
   maturity threshold ``m`` (``a > m``);
4. while ``c_l >= 1`` (and an eligible unit is left): the eligible unit with the smallest
   utility is replaced and ``c_l -= 1``. Its incoming weights are redrawn from the layer's
   initial distribution, its incoming bias and outgoing weights are set to 0 (so the network
   computes the same function as with the old unit pruned), normalisation entries are reset,
   the optimizer state of those entries is zeroed (``reset_optimizer_state``), and its utility
   and age are set to 0.

Utilities, with ``h_i`` the unit's activation averaged over the minibatch (and over spatial
positions for a conv channel) and decay rate ``eta``:

* ``"contribution"``, equation (1) of the paper:
  ``u_i <- eta * u_i + (1 - eta) * E|h_i| * sum_k |w_out[k, i]|``, the sum running over every
  outgoing weight of the unit (all consumer units, and all kernel taps or flattened positions
  of a channel). ``eta = 0`` gives the instantaneous minibatch utility (Extended Data Fig. 5d).
* ``"adaptable_contribution"`` (the paper's supervised experiments):
  ``u_i <- eta * u_i + (1 - eta) * E|h_i - hhat_i| * sum_k |w_out[k, i]| / mean_j |w_in[i, j]|``
  with the mean-corrected activation ``hhat_i = f_i / (1 - eta^{a_i})`` and
  ``f_i <- eta * f_i + (1 - eta) * E[h_i]``. The paper's code takes the mean rather than the
  sum of outgoing magnitudes; that is a per-layer constant and ranks units identically.

Units are ranked by the bias-corrected utility ``u_i / (1 - eta^{a_i})`` (Adam-style, per unit),
which only matters for units whose age is close to the maturity threshold.

The count ``c_l`` accumulates fractions of a unit across steps (the paper's Algorithm 1), so
over ``n`` steps a layer with ``E`` eligible units replaces ``floor(rho * E * n)`` units. The
paper's PPO code instead replaced, each step, one unit with probability ``rho * E`` when
``rho * E < 1`` and ``floor(rho * E)`` units otherwise (``accumulate=False``); the expected
number is the same.

Cost: with ``eta > 0`` a step is a handful of tensor ops per layer (one read of the outgoing
weights); with ``eta = 0`` nothing is computed on steps that replace nothing. Eligible counts
are kept on the host (all seeds share one age schedule), selection and replacement run on the
device: a step never synchronises with the GPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ppo_cbp.nets import kernels
from ppo_cbp.nets.units import (
    ActivationRecorder,
    FlatUnits,
    StateTensors,
    UnitLayer,
    optimizer_state_tensors,
    replace_units_,
    sequential_unit_layers,
)
from ppo_cbp.plasticity.hooks import PlasticityMethod

UTILITIES = ("contribution", "adaptable_contribution")


def make_generators(
    seed: int | Sequence[int], num_seeds: int, device: torch.device
) -> list[torch.Generator]:
    """One generator per seed (``seed`` an int for a single network, else one per network)."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) != num_seeds:
        raise ValueError(f"{num_seeds} networks need {num_seeds} seeds, got {len(seeds)}")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def resolve_layers(
    net: nn.Module | Sequence[UnitLayer], init: str, nonlinearity: str | None
) -> tuple[list[UnitLayer], ActivationRecorder | None]:
    """Unit layers of ``net`` with hooks recording their activations, or the given layers.

    A module that defines ``unit_layers() -> (layers, modules)`` (such as the ResNet-18) says
    itself where its units are; any other module must be an ``nn.Sequential``.
    """
    if hasattr(net, "unit_layers"):
        layers, taps = net.unit_layers()
        return layers, ActivationRecorder(taps)
    if isinstance(net, nn.Module):
        layers, taps = sequential_unit_layers(net, init, nonlinearity)
        return layers, ActivationRecorder(taps)
    layers = list(net)
    if not layers or not all(isinstance(layer, UnitLayer) for layer in layers):
        raise TypeError("expected an nn.Sequential or a non-empty list of UnitLayer")
    if len({layer.num_seeds for layer in layers}) != 1:
        raise ValueError("all layers must hold the same number of seeds")
    return layers, None


class ContinualBackprop(PlasticityMethod):
    """Continual backprop's generate-and-test step for one network (or S stacked networks).

    :param net: an ``nn.Sequential`` (forward hooks are registered once on its activation modules
        and record the latest forward pass), or a list of :class:`~ppo_cbp.nets.units.UnitLayer`
        whose activations are passed to :meth:`step`.
    :param optimizer: the optimizer whose state is reset for replaced entries; or a function
        from a parameter to its state tensors (for hand-written optimizers); or None.
    :param replacement_rate: rho, fraction of eligible units replaced per step, in [0, 1].
    :param maturity_threshold: m, a unit is eligible once its age exceeds m steps.
    :param decay_rate: eta, in [0, 1), the utilities' running-average decay.
    :param utility: ``"contribution"`` or ``"adaptable_contribution"``.
    :param init: the scheme the network was initialised with (:mod:`ppo_cbp.init`).
    :param nonlinearity: overrides the gain inferred from the activation modules.
    :param reset_optimizer_state: zero the optimizer state of replaced entries (the paper's
        released code did not).
    :param fold_bias: add a replaced unit's bias-corrected mean output times its outgoing weights
        to the consumer's bias (off in the paper, whose version of it never took effect).
        For a Linear consumer fed only through those weights this keeps the consumer's
        input unchanged in expectation; a conv consumer's zero padding and a path that
        bypasses the weights (a residual shortcut) are not compensated.
    :param accumulate: count units to replace as Algorithm 1 (True), or draw each step's count as
        the paper's PPO code did (False; one network only, host draws from ``seed``).
    :param seed: seed of the generator that draws new weights; one per network when stacked.
    """

    def __init__(
        self,
        net: nn.Module | Sequence[UnitLayer],
        optimizer: torch.optim.Optimizer | StateTensors | None = None,
        *,
        replacement_rate: float = 1e-4,
        maturity_threshold: int = 100,
        decay_rate: float = 0.99,
        utility: str = "contribution",
        init: str = "kaiming_uniform",
        nonlinearity: str | None = None,
        reset_optimizer_state: bool = True,
        fold_bias: bool = False,
        accumulate: bool = True,
        seed: int | Sequence[int] = 0,
    ):
        if not 0.0 <= replacement_rate <= 1.0:
            raise ValueError(f"replacement_rate must be in [0, 1], got {replacement_rate}")
        if maturity_threshold < 0 or int(maturity_threshold) != maturity_threshold:
            raise ValueError(
                f"maturity_threshold must be a non-negative integer, got {maturity_threshold}"
            )
        if not 0.0 <= decay_rate < 1.0:
            raise ValueError(f"decay_rate must be in [0, 1), got {decay_rate}")
        if utility not in UTILITIES:
            raise ValueError(f"unknown utility {utility!r}; expected one of {', '.join(UTILITIES)}")
        self.layers, self._recorder = resolve_layers(net, init, nonlinearity)
        self.replacement_rate = replacement_rate
        self.maturity_threshold = int(maturity_threshold)
        self.decay_rate = decay_rate
        self.utility_type = utility
        self.fold_bias = fold_bias
        self._state_tensors = optimizer_state_tensors(optimizer, reset_optimizer_state)
        first = self.layers[0].weight
        self.num_seeds = self.layers[0].num_seeds
        self.generators = make_generators(seed, self.num_seeds, first.device)
        self._count_rng = None
        if not accumulate:
            if self.num_seeds != 1:
                raise ValueError("accumulate=False draws one count per step: one network only")
            # on the host, so drawing a count never waits for the device
            self._count_rng = np.random.default_rng(int(seed if isinstance(seed, int) else seed[0]))
        self._track_mean = utility == "adaptable_contribution" or fold_bias

        # one flat buffer per quantity, each layer's [S, units] block a view of it
        self._flat = FlatUnits(self.layers)

        def zeros(dtype: torch.dtype = first.dtype) -> Tensor:
            return torch.zeros(self._flat.size, device=first.device, dtype=dtype)

        # the running averages side by side: one op decays both
        n = self._flat.size
        self._decaying = torch.zeros(
            2 * n if self._track_mean else n, device=first.device, dtype=first.dtype
        )
        self._utility, self._birth = self._decaying[:n], zeros(torch.int64)
        self._mean = self._decaying[n:] if self._track_mean else None
        self.utility = self._flat.views(self._utility)
        """Running utility ``u`` of every unit, ``[S, units]`` per layer."""
        self.mean_activation = None if self._mean is None else self._flat.views(self._mean)
        """Running mean activation ``f`` (before bias correction), when it is needed."""
        self.birth = self._flat.views(self._birth)
        """Step at which each unit was last (re)initialised; its age is ``steps - birth``."""
        self._fused: dict[str, Any] | None = None
        self._correction: Tensor | None = None
        self._constants: dict[str, Tensor] | None = None
        """``1 - eta^age`` of every unit, kept step by step where the adaptable utility needs it
        on every step (tensor ops); else computed from the ages when units are selected."""
        self.steps = 0
        self.to_replace = [0.0] * len(self.layers)
        """Accumulated fractional count ``c_l`` of units to replace."""
        self._recent: list[deque[tuple[int, int]]] = [deque() for _ in self.layers]
        self._recent_total = [0] * len(self.layers)
        self._updated_previous = False
        self._magnitudes_checked = False
        self._kernel_state = None
        self._arrays = kernels.ArrayViews()
        linear = all(layer.weight.dim() - layer.seed_dims == 2 for layer in self.layers)
        if linear and kernels.available(*self.utility):
            # array views of the state the CPU kernel updates in place (never reallocated)
            self._kernel_state = [
                kernels.UtilityUpdate(
                    kernels.as_array(self.utility[i]),
                    kernels.as_array(self.mean_activation[i])
                    if utility == "adaptable_contribution"
                    else None,
                    kernels.as_array(self.birth[i]),
                    layer.fan_in,
                    decay_rate,
                )
                for i, layer in enumerate(self.layers)
            ]
        self.num_replaced = 0
        """Units replaced so far in each network (summed over layers; the same for all seeds)."""

    # ----------------------------------------------------------------------------------------
    def ages(self, layer_index: int) -> Tensor:
        """Age of every unit of a layer, ``[S, units]``."""
        return self.steps - self.birth[layer_index]

    def num_eligible(self, layer_index: int) -> int:
        """Units older than the maturity threshold, from the host's record of replacements."""
        if self.steps <= self.maturity_threshold:
            return 0
        recent, oldest = self._recent[layer_index], self.steps - self.maturity_threshold
        while recent and recent[0][0] < oldest:
            self._recent_total[layer_index] -= recent.popleft()[1]
        return self.layers[layer_index].units - self._recent_total[layer_index]

    def _keeps_correction(self) -> bool:
        return (
            self._kernel_state is None
            and self.utility_type == "adaptable_contribution"
            and self.decay_rate > 0.0
        )

    def _advance_correction(self) -> None:
        """``1 - eta^age`` one step older: ``c <- c + (1 - eta) (1 - c)``; from the ages at first."""
        if self._correction is None:
            eta = torch.tensor(
                self.decay_rate, dtype=self._utility.dtype, device=self._birth.device
            )
            self._correction = torch.pow(eta, torch.rsub(self._birth, self.steps)).neg_().add_(1.0)
            self._correction_views = self._flat.views(self._correction)
        else:
            self._correction.lerp_(self._fused_constants()["one"], 1.0 - self.decay_rate)

    def _fused_constants(self) -> dict[str, Tensor]:
        if self._constants is None:
            u = self._utility
            self._constants = {
                "one": torch.ones((), dtype=u.dtype, device=u.device),
                "eta": torch.tensor(self.decay_rate, dtype=u.dtype, device=u.device),
            }
        return self._constants

    def _bias_correction(self, layer_index: int) -> Tensor:
        if self._correction is not None:
            return self._correction_views[layer_index]
        return 1.0 - torch.pow(
            self.decay_rate, self.ages(layer_index).to(self.utility[layer_index].dtype)
        )

    def _update_utility_kernel(
        self, i: int, layer: UnitLayer, h: Tensor, magnitude: tuple[Tensor, Tensor] | None
    ) -> None:
        """:meth:`_update_utility` on CPU for a Linear layer: one fused pass over its units.

        ``magnitude``: the given ``(sum |w_out|, sum |w_in|)`` per unit, or None to read the
        weights (one pass over the consumer's weights, whose row sums the next layer reuses).
        Single-threaded: on tensors of this size a multi-threaded reduction costs several times
        more than one thread.
        """
        update = self._kernel_state[i]
        h = layer.seeded(h)
        in_abs, fan_in = None, None
        # the trainer hands the same tensors every step: their array views are kept
        arrays = kernels.as_array if magnitude is None else self._arrays
        if magnitude is not None:
            out_abs, in_abs = magnitude
            out_abs = None if layer.out_weight is None else out_abs
        else:
            out_abs = layer.out_magnitude()
            if update.mean is not None:
                previous = self.layers[i - 1] if i > 0 and self._updated_previous else None
                in_abs, fan_in = layer.in_magnitude(previous), 1  # already the mean
        if self._track_mean and update.mean is None:  # fold_bias with the contribution utility
            self.mean_activation[i].lerp_(h.mean(1), 1.0 - self.decay_rate)
        update(
            self.steps,
            arrays(h),
            None if out_abs is None else arrays(out_abs),
            None if in_abs is None else arrays(in_abs),
            fan_in,
        )

    def _update_utility(
        self, i: int, layer: UnitLayer, h: Tensor, magnitude: tuple[Tensor, Tensor] | None
    ) -> None:
        """``u <- eta * u + (1 - eta) * y`` with the instantaneous utility ``y`` of the module docstring."""
        adaptable = self.utility_type == "adaptable_contribution"
        if self._track_mean:
            self.mean_activation[i].lerp_(layer.mean(h), 1.0 - self.decay_rate)
        if magnitude is not None:
            out = None if layer.out_weight is None else magnitude[0]
        else:
            out = layer.out_magnitude()
        if not adaptable:
            activity, count = layer.abs_sum(h)
        else:
            activity, count = layer.abs_sum(h, self.mean_activation[i] / self._bias_correction(i))
            if magnitude is not None:
                activity.div_(magnitude[1] / layer.fan_in)
            else:
                # the previous layer's out_magnitude this step already holds |this layer's weight|
                previous = self.layers[i - 1] if i > 0 and self._updated_previous else None
                activity.div_(layer.in_magnitude(previous))
        weight = (1.0 - self.decay_rate) / count
        u = self.utility[i].mul_(self.decay_rate)
        if out is None:
            u.add_(activity, alpha=weight)
        else:
            u.addcmul_(activity, out, value=weight)

    @torch.no_grad()
    def step(
        self,
        activations: Sequence[Tensor] | None = None,
        magnitudes: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> int:
        """One generate-and-test step; call right after the optimizer step.

        :param activations: per hidden layer, its output ``h`` on the minibatch just used
            (``[*seed, B, units]`` or ``[*seed, B, C, H, W]``). Omit when the network is
            hooked: the latest forward pass is used.
        :param magnitudes: per hidden layer of a Linear network, ``(sum_k |w_out[k, i]|,
            sum_j |w_in[i, j]|)`` of the weights after the optimizer step, ``[*seed, units]``
            each, when the trainer computed them already (as
            :attr:`ppo_cbp.nets.stacked_mlp.StackedTrainer.magnitudes` does while updating); the
            weights are then not read again. On CPU the utility is then updated by one
            fused kernel per layer (:class:`ppo_cbp.nets.kernels.UtilityUpdate`).
        :return: the number of units replaced in each network by this step.
        """
        if activations is None:
            if self._recorder is None:
                raise ValueError("pass the activations of every hidden layer to step()")
            activations = self._recorder.latest()
        if len(activations) != len(self.layers):
            raise ValueError(
                f"expected activations of {len(self.layers)} layers, got {len(activations)}"
            )
        if magnitudes is not None and not self._magnitudes_checked:
            self._check_magnitudes(magnitudes)
        self.steps += 1
        eta = self.decay_rate
        counts = []
        for i in range(len(self.layers)):
            eligible = self.num_eligible(i)
            expected = self.replacement_rate * eligible
            if self._count_rng is not None:
                draw = expected > 0 and self._count_rng.random() < expected
                k = int(expected) if expected >= 1 else int(draw)
                self.to_replace[i] = float(k)  # nothing carries over to the next step
            else:
                self.to_replace[i] += expected
            # The tolerance keeps decimal rates exact: 0.3 added ten times is 2.9999999999999996.
            counts.append(min(int(self.to_replace[i] + 1e-9), eligible))
        if self._keeps_correction():
            self._advance_correction()
        if not any(counts) and self._kernel_state is None:
            # nothing to replace: every layer's update at once, in a fixed number of ops; with
            # eta = 0 a utility is that of the replacing step alone, so nothing is kept
            if eta > 0.0:
                self._fused_update(activations, magnitudes)
            return 0
        replaced = 0
        self._updated_previous = False
        for i, (layer, h) in enumerate(zip(self.layers, activations)):
            k = counts[i]
            if eta == 0.0 and k == 0:
                self._updated_previous = False
                continue
            magnitude = None
            if magnitudes is not None:
                magnitude = (layer.seeded(magnitudes[i][0]), layer.seeded(magnitudes[i][1]))
            if self._kernel_state is not None:
                self._update_utility_kernel(i, layer, h, magnitude)
            else:
                self._update_utility(i, layer, h, magnitude)
            self._updated_previous = True
            if k == 0:
                continue
            self.to_replace[i] -= k
            self._updated_previous = False  # the replacement below changes the cached |weight|
            ages = self.ages(i)
            score = self.utility[i] / self._bias_correction(i) if eta > 0 else self.utility[i]
            score = score.masked_fill(ages <= self.maturity_threshold, float("inf"))
            index = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
            mean_output = None
            if self.fold_bias:
                mean_output = (
                    self.mean_activation[i] / self._bias_correction(i) if eta > 0 else layer.mean(h)
                )
            if magnitudes is not None and i + 1 < len(self.layers):
                # the next layer's incoming magnitudes lose the outgoing weights zeroed below
                w = layer.seeded(layer.out_weight)
                cols = index.unsqueeze(1).expand(w.shape[0], w.shape[1], k)
                out_abs, in_abs = magnitudes[i + 1]
                lost = w.gather(2, cols).abs().sum(-1)
                magnitudes = list(magnitudes)
                magnitudes[i + 1] = (out_abs, in_abs - lost.view(in_abs.shape))
            replace_units_(layer, index, self.generators, self._state_tensors, mean_output)
            self.utility[i].scatter_(1, index, 0.0)
            if self.mean_activation is not None:
                self.mean_activation[i].scatter_(1, index, 0.0)
            self.birth[i].scatter_(1, index, self.steps)
            if self._correction is not None:
                self._correction_views[i].scatter_(1, index, 0.0)
            self._recent[i].append((self.steps, k))
            self._recent_total[i] += k
            replaced += k
        self.num_replaced += replaced
        return replaced

    def _fused_update(
        self, activations: Sequence[Tensor], magnitudes: Sequence[tuple[Tensor, Tensor]] | None
    ) -> None:
        """:meth:`_update_utility` of every layer at once, on the flat buffers.

        With ``a_i = sum_b mean_p |h - hhat|`` (:meth:`FlatUnits.abs_sums`, ``hhat = 0`` for the
        contribution utility), ``o_i = sum_k |w_out[k, i]|`` (1 without a consumer) and
        ``n_i = sum_j |w_in[i, j]|``: ``u <- eta u + (1 - eta) / B * a o`` (contribution) or
        ``u <- eta u + (1 - eta) fan_in / B * a o / n`` (adaptable contribution), and
        ``f <- eta f + (1 - eta) / B * sum_b mean_p h``; the same values as the per-layer
        update up to rounding.
        """
        flat, eta = self._flat, self.decay_rate
        batch, _ = flat.batch_and_positions(activations)
        state = self._fused
        if state is None or state["batch"] != batch:
            state = self._fused = self._fused_state(batch)
        adaptable = self.utility_type == "adaptable_contribution"
        out, inc = state["out"], state["in"]
        if magnitudes is None:
            flat.out_sums(state["out_blocks"])
            if adaptable:
                inc = flat.in_sums(inc, state["in_blocks"])
        else:
            given = [(t if t.dim() == 1 else t.reshape(-1)) for pair in magnitudes for t in pair]
            torch.cat(
                [g if self.layers[i // 2].out_weight is not None else state["ones"][i // 2]
                 for i, g in enumerate(given) if i % 2 == 0],
                out=out,
            )  # fmt: skip
            if adaptable:
                torch.cat(given[1::2], out=inc)
        x = flat.concat(activations)
        eta_t = self._fused_constants()["eta"]
        self._decaying.mul_(eta_t)
        if self._track_mean:
            self._mean.add_(flat.sums(x), alpha=(1.0 - eta) / batch)
        center = self._mean / self._correction if adaptable else None
        product = flat.abs_sums(x, center).mul_(out)
        if adaptable:
            self._utility.addcmul_(product.div_(inc), state["coef"])
        else:
            self._utility.add_(product, alpha=(1.0 - eta) / batch)

    def _fused_state(self, batch: int) -> dict[str, Any]:
        """Buffers and constants of :meth:`_fused_update` for minibatches of ``batch``."""
        flat, u = self._flat, self._utility
        fan_in = [layer.fan_in for layer in self.layers]
        ones = [
            torch.ones(flat.num_seeds * layer.units, dtype=u.dtype, device=u.device)
            for layer in self.layers
        ]
        out, inc = torch.ones_like(u), torch.ones_like(u)  # out stays 1 without a consumer
        return {
            "batch": batch,
            "out": out,
            "in": inc,
            "out_blocks": flat.destinations(out),
            "in_blocks": flat.destinations(inc),
            "ones": ones,
            "coef": flat.per_layer([(1.0 - self.decay_rate) * n / batch for n in fan_in], u.dtype),
        }

    def _check_magnitudes(self, magnitudes: Sequence[tuple[Tensor, Tensor]]) -> None:
        if len(magnitudes) != len(self.layers):
            raise ValueError(
                f"expected magnitudes of {len(self.layers)} layers, got {len(magnitudes)}"
            )
        for i, (layer, (out_abs, in_abs)) in enumerate(zip(self.layers, magnitudes)):
            shape = (*layer.seed_shape, layer.units)
            chained = i + 1 == len(self.layers) or (
                layer.out_weight is not None
                and layer.out_weight.data_ptr() == self.layers[i + 1].weight.data_ptr()
            )
            linear = layer.weight.dim() - layer.seed_dims == 2 and layer.out_group == 1
            if not (linear and chained and out_abs.shape == shape and in_abs.shape == shape):
                raise ValueError(
                    f"{layer.name}: magnitudes are for a chain of Linear layers, "
                    f"[*seed, units] = {shape} per layer"
                )
        self._magnitudes_checked = True

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        """The hook protocol's name for :meth:`step` on the step's hidden activations."""
        self.step(hidden)

    def remove_hooks(self) -> None:
        """Stop recording activations (the network no longer pays for the hooks)."""
        if self._recorder is not None:
            self._recorder.remove()

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loadable with ``torch.load(weights_only=True)``."""
        return {
            "utility": [u.clone() for u in self.utility],
            "mean_activation": None
            if self.mean_activation is None
            else [f.clone() for f in self.mean_activation],
            "birth": [b.clone() for b in self.birth],
            "steps": self.steps,
            "to_replace": list(self.to_replace),
            "recent": [[list(e) for e in r] for r in self._recent],
            "num_replaced": self.num_replaced,
            "generators": [g.get_state() for g in self.generators],
            "count_rng": None
            if self._count_rng is None
            else _plain(self._count_rng.bit_generator.state),
            "correction": None if self._correction is None else self._correction.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.utility, state["utility"]):
            dst.copy_(src)
        if self.mean_activation is not None:
            for dst, src in zip(self.mean_activation, state["mean_activation"]):
                dst.copy_(src)
        for dst, src in zip(self.birth, state["birth"]):
            dst.copy_(src)
        self.steps = int(state["steps"])
        self.to_replace = [float(c) for c in state["to_replace"]]
        self._recent = [deque((int(t), int(k)) for t, k in r) for r in state["recent"]]
        self._recent_total = [sum(k for _, k in r) for r in self._recent]
        self.num_replaced = int(state["num_replaced"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        if self._count_rng is not None:
            self._count_rng.bit_generator.state = state["count_rng"]
        # recomputed from the ages at the next step if the state has none
        self._correction = None
        if state.get("correction") is not None and self._keeps_correction():
            self._correction = state["correction"].to(self._utility.device, self._utility.dtype)
            self._correction_views = self._flat.views(self._correction)


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """A numpy bit generator's state with Python ints only (loadable with weights_only)."""
    return {
        k: _plain(v) if isinstance(v, dict) else (int(v) if isinstance(v, np.integer) else v)
        for k, v in state.items()
    }
