"""Resets at a task boundary: Adam's state (:class:`AdamStateReset`) and the last weight layers
of the network (:class:`LayerReset`), with the two primitives they share and Shrink & Perturb
uses too: :func:`fresh_weight` (a new per-seed draw from a layer's init scheme) and
:func:`reset_adam_state_` (Adam's state of some parameters back to that of a new optimizer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.init import distribution, fans, sample
from ppo_cbp.nets.units import state_of_base, view_of
from ppo_cbp.plasticity.hooks import Layer, Network, PlasticityMethod, generators_for
from ppo_cbp.seeding import TAG_LAYER_RESET

__all__ = [
    "AdamStateReset",
    "LayerReset",
    "fresh_weight",
    "reset_adam_state_",
    "check_adam",
    "set_generator_states",
]

_ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def fresh_weight(
    layer: Layer,
    seed_dims: int,
    generators: Sequence[torch.Generator],
    out: Tensor | None = None,
) -> Tensor:
    """A new draw of ``layer.weight`` from its init scheme and gain, shaped like the weight
    (into ``out``, contiguous, when given: a method that draws at every step keeps one).

    Seed ``s``'s slice is one draw of the slice's shape from ``generators[s]``, so a seed draws
    the same numbers stacked with others as alone.
    """
    w = layer.weight
    num_seeds = w.shape[0] if seed_dims else 1
    if len(generators) != num_seeds:
        raise ValueError(f"{layer.name}: {len(generators)} generators for {num_seeds} seeds")
    kind, scale = distribution(layer.init, layer.nonlinearity, *fans(w.shape, seed_dims))
    shape = tuple(w.shape[seed_dims:])
    if out is not None:
        for s, g in enumerate(generators):
            target = out[s] if seed_dims else out
            sample(shape, kind, scale, generator=g, device=w.device, dtype=w.dtype, out=target)
        return out
    draws = [
        sample(shape, kind, scale, generator=g, device=w.device, dtype=w.dtype) for g in generators
    ]
    return torch.stack(draws) if seed_dims else draws[0]


def check_adam(optimizer: torch.optim.Optimizer | None, who: str) -> None:
    """Raise ValueError unless ``optimizer`` is ``torch.optim.Adam`` or ``AdamW``."""
    if not isinstance(optimizer, _ADAMS):
        raise ValueError(
            f"{who} resets Adam's state: the network's optimizer must be torch.optim.Adam or "
            f"AdamW, got {type(optimizer).__name__}"
        )


@torch.no_grad()
def reset_adam_state_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> None:
    """Zero ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) and the step count of each
    parameter in ``optimizer.state``, in place.

    Adam's next step on such a parameter is then exactly a new Adam's first step: the step
    count becomes 1, the moments ``(1 - beta) g`` and ``(1 - beta2) g^2``, and the bias
    corrections those of step 1. The tensors are zeroed rather than dropped because code that
    holds them keeps working (``ppo_numerics.AdamStep`` steps the fused Adam's state tensors
    directly; fused and capturable Adam keep the step count on the device). A parameter with
    no state yet (no step taken) is left as it is: Adam creates fresh state on its first step.
    """
    # Views of a tensor the optimizer steps whole (a layer's weight and bias of the fused
    # trainer's P = [W | b]): that tensor's state is reset when the views given cover it,
    # else only the moments of the views' entries (its step count is the whole tensor's).
    direct: list[Tensor] = []
    views: dict[int, tuple[Tensor, list[Tensor]]] = {}
    for p in params:
        base = p._base
        if p in optimizer.state or base is None or base not in optimizer.state:
            direct.append(p)
        else:
            views.setdefault(id(base), (base, []))[1].append(p)
    for base, parts in views.values():
        if sum(v.numel() for v in parts) == base.numel():
            direct.append(base)
        else:
            for v in parts:
                for t in state_of_base(optimizer, v).values():
                    view_of(t, v).zero_()
    for p in direct:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":  # a Python number in older torch versions
                state[key] = 0


class AdamStateReset(PlasticityMethod):
    """Reset Adam's state of every parameter at each task boundary.

    At :meth:`at_task_boundary`, for every parameter ``p`` of ``net.parameters``:
    ``exp_avg = 0``, ``exp_avg_sq = 0`` (and ``max_exp_avg_sq = 0`` with amsgrad) and the step
    count ``0``, so the first step on the new task is that of a freshly built Adam (with the
    same hyperparameters) on the current parameters. Stacked seeds share one step count per
    parameter; every seed is reset at the same boundary, as each would be alone.

    Resetting Adam's moments when the objective changes is studied by Asadi, Fakoor and Sabach
    (2023), "Resetting the Optimizer in Deep RL: An Empirical Study" (NeurIPS), who reset them
    at every target-network update; Juliani and Ash (2024, "A Study of Plasticity Loss in
    On-Policy Deep Reinforcement Learning") build a new Adam(W) at every distribution shift.

    The parameters are ``net.parameters`` as they are at the boundary, so after a plasticity
    injection the trainable branch's state is reset and the frozen head (which has none) is
    not looked at.

    :param net: the network; ``net.optimizer`` must be ``torch.optim.Adam`` or ``AdamW``
        (fused, foreach or for-loop; amsgrad or not).
    """

    name = "adam_state_reset"

    def __init__(self, net: Network):
        check_adam(net.optimizer, "AdamStateReset")
        self.net = net
        self.optimizer = net.optimizer

    @property
    def params(self) -> list[Tensor]:
        """The parameters whose state is reset: ``net.parameters`` now."""
        return list(self.net.parameters)

    def at_task_boundary(self) -> None:
        reset_adam_state_(self.optimizer, self.net.parameters)


class LayerReset(PlasticityMethod):
    """Reinitialise the last ``layers`` weight layers at each task boundary (Nikishin, Schwarzer,
    D'Oro, Bacon and Courville, 2022, "The Primacy Bias in Deep Reinforcement Learning", ICML).

    At :meth:`at_task_boundary`, each of the last ``layers`` entries of ``net.layers`` (the head
    is the last) gets a new weight drawn from its init scheme and gain (:func:`fresh_weight`;
    seed ``s`` draws from its own generator, stream :data:`~ppo_cbp.seeding.TAG_LAYER_RESET`, the reset layers
    input side first) and a zero bias (this project's bias init), and the Adam state of that
    weight and bias is reset (:func:`reset_adam_state_`), so their next update is a new Adam's
    first step, as for a freshly built layer with a new optimizer. The other layers and their
    optimizer state are untouched.

    The paper resets periodically (every 2e5 environment steps for SAC on DM Control, every 2e4
    for SPR on Atari 100k); here the reset happens at task boundaries. Default ``layers=1``, the head only: the authors' SPR
    configuration resets the head (``reset_head = True`` in ``SPR_with_resets.gin`` of
    github.com/evgenii-nikishin/rl_with_resets); for SAC they reset every layer
    (``layers=len(net.layers)``).

    The layers are the last ``layers`` of ``net.layers`` as they are at the boundary, so a layer
    that took another's place (a plasticity injection's trainable branch) is the one reset.

    :param net: the network; its optimizer, if any, must be ``torch.optim.Adam``, ``AdamW`` or
        ``SGD`` (whose momentum buffers are zeroed: with no dampening, the next step is a
        fresh SGD's first) or None (only the weights are reset).
    :param layers: how many weight layers to reset, counted from the head; 1 to
        ``len(net.layers)``.
    """

    name = "layer_reset"

    def __init__(self, net: Network, layers: int = 1):
        if isinstance(layers, bool) or int(layers) != layers:
            raise ValueError(f"layers must be an integer, got {layers!r}")
        if not 1 <= layers <= len(net.layers):
            raise ValueError(
                f"layers must be in [1, {len(net.layers)}] (the net's weight layers), got {layers}"
            )
        if net.optimizer is not None and not isinstance(net.optimizer, torch.optim.SGD):
            check_adam(net.optimizer, "LayerReset")
        self.net = net
        self.count = int(layers)
        self.generators = generators_for(net, TAG_LAYER_RESET)

    @property
    def layers(self) -> list[Layer]:
        """The layers reset: the last :attr:`count` of ``net.layers`` now."""
        return self.net.layers[len(self.net.layers) - self.count :]

    @torch.no_grad()
    def at_task_boundary(self) -> None:
        for layer in self.layers:
            layer.weight.copy_(fresh_weight(layer, self.net.seed_dims, self.generators))
            if layer.bias is not None:
                layer.bias.zero_()
            if self.net.optimizer is not None:
                reset_adam_state_(
                    self.net.optimizer, [t for t in (layer.weight, layer.bias) if t is not None]
                )

    def state_dict(self) -> dict[str, Any]:
        return {"generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_states(self.generators, state["generators"])


def set_generator_states(generators: Sequence[torch.Generator], states: Sequence[Tensor]) -> None:
    """Restore each generator's state (from ``[g.get_state() for g in generators]``)."""
    if len(states) != len(generators):
        raise ValueError(f"{len(states)} generator states for {len(generators)} seeds")
    for g, s in zip(generators, states):
        g.set_state(s)
