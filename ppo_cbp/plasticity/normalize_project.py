"""Normalize-and-Project (Lyle, Zheng, Khetarpal, Martens, van Hasselt, Pascanu and Dabney,
"Normalization and effective learning rates in reinforcement learning", NeurIPS 2024).

*Normalize*: a LayerNorm between every hidden Linear layer and its activation
(:func:`layer_norm_mlp`; with the CReLU activation, :func:`~ppo_cbp.nets.crelu.crelu_mlp`
with ``layer_norm=True``). On its own this is the LayerNorm of Lyle et al., "Disentangling the
causes of plasticity loss in neural networks" (2024). A layer followed by a normalisation
computes the same function whatever the scale of its weights, but its effective learning rate
falls as their norm grows; *project* (:class:`NormalizeAndProject`) holds every layer's
parameter norm at its initial value after each optimizer step, so that the effective learning
rate stays that of initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ppo_cbp.init import init_linear_
from ppo_cbp.plasticity.hooks import Network, PlasticityMethod
from ppo_cbp.plasticity.l2_init import STATE_VERSION, FollowedTensors

__all__ = ["NormalizeAndProject", "layer_norm_mlp", "layer_norms"]

NormParameters = tuple[Tensor | None, Tensor | None]
"""A normalisation layer's gain and offset (None where it has none)."""


def layer_norm_mlp(
    in_dim: int, hidden: Sequence[int], out_dim: int, init: str = "kaiming_uniform"
) -> nn.Sequential:
    """``Linear, LayerNorm, ReLU, ..., Linear``, every Linear drawn from ``init`` with the ReLU
    gain and a zero bias (as :func:`ppo_cbp.ppo.agent.make_mlp`), every LayerNorm with gain 1 and
    offset 0 (PyTorch's, eps 1e-5)."""
    if in_dim < 1 or out_dim < 1 or any(w < 1 for w in hidden):
        raise ValueError(
            f"widths must be positive, got in_dim={in_dim}, hidden={list(hidden)}, out_dim={out_dim}"
        )
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    for m in layers:
        if isinstance(m, nn.Linear):
            init_linear_(m, init, "relu")
    return nn.Sequential(*layers)


def layer_norms(module: nn.Module) -> list[NormParameters]:
    """The gain and offset of every LayerNorm of ``module``, in order: of an ``nn.Sequential``
    (or any module, by :meth:`~torch.nn.Module.modules`) or the stacked ``[S, n]`` ones of a
    :class:`~ppo_cbp.nets.stacked_sequential.StackedSequential`."""
    if hasattr(module, "layer_norms"):
        return list(module.layer_norms())
    return [(m.weight, m.bias) for m in module.modules() if isinstance(m, nn.LayerNorm)]


def _per_seed_norm(tensors: Sequence[Tensor], seeded) -> Tensor:
    """The L2 norm of the given tensors together, per seed: ``[S]``."""
    squares = [seeded(t).flatten(1).square().sum(dim=1) for t in tensors]
    return torch.stack(squares).sum(dim=0).sqrt_()


class NormalizeAndProject(PlasticityMethod):
    """Project every layer's parameters back to their initial norm after each optimizer step.

    For every weight layer ``l`` of the network, output layer included, and seed ``s``:

        W_l <- W_l * ||W_l(0)||_F / ||W_l||_F

    (the Frobenius norm of the whole weight, ``[out, in]`` or ``[out, in, kh, kw]``; per layer,
    not per unit), and for every normalisation layer, its gain and offset jointly:

        (gamma, beta) <- (gamma, beta) * ||(gamma(0), beta(0))|| / ||(gamma, beta)||,

    whose initial norm is ``sqrt(n)`` for gain 1 and offset 0 over ``n`` features. ``W(0)`` are
    the values when the method is built (build it right after initialisation); each seed has its
    own initial norms and is projected on its own. The weight layers' biases are not projected,
    and the optimizer's state is left as it is.

    Sources: the paper keeps the parameter norm of each layer constant (layer by layer, not one
    norm for the whole network). The details follow the public reimplementations, the
    authors' code not being public: every weight matrix projected, the output layer included,
    biases not (Plasticine's NaP for PPO); the gain and offset projected jointly to their
    initial norm (a Flax NaP). With a ReLU after the LayerNorm, scaling gain and offset together
    scales the ReLU's output, which the next layer's LayerNorm undoes up to that layer's bias.
    ``project_head=False`` leaves the output layer free, ``project_norms=False`` the gains and
    offsets.

    Regrouped layers: the weights are those of ``net.layers`` as they are at each call
    (:class:`~ppo_cbp.plasticity.l2_init.FollowedTensors`). A weight that takes a layer's place
    after the build (the trainable branch of a plasticity injection) is held at its own norm
    when the method first sees it, at the next :meth:`after_backward` (before its first step:
    its initialisation), as L2 Init takes its ``theta_0``; a weight that left (the head an
    injection freezes) is no longer projected, so the frozen head keeps its values and the
    output stays unchanged at the injection. The normalisation layers are not regrouped.

    Checkpoints: :meth:`state_dict` holds the weights' initial norms in the order of the
    current layers and :meth:`load_state_dict` binds them at the next call (it may run before
    an injection's load regroups the layers); states without a ``version`` hold those of the
    layers the method was built with.

    :param net: the network; every layer of ``net.layers`` is projected (the head only with
        ``project_head``).
    :param norms: the ``(gain, offset)`` of each normalisation layer, ``[*seed, n]`` each or None
        (:func:`layer_norms`).
    :param project_head: project the output layer's weight too (default True).
    :param project_norms: project each normalisation layer's gain and offset jointly (default True).
    """

    name = "nap"

    def __init__(
        self,
        net: Network,
        norms: Sequence[NormParameters] = (),
        *,
        project_head: bool = True,
        project_norms: bool = True,
    ):
        if net.seed_dims not in (0, 1):
            raise ValueError(f"seed_dims must be 0 or 1, got {net.seed_dims}")
        self.net = net
        self.project_head = project_head
        self.project_norms = project_norms
        seeds = net.num_seeds
        weights = self._projected()
        self.norm_groups: list[list[Tensor]] = []
        if project_norms:
            for i, pair in enumerate(norms):
                group = [t for t in pair if t is not None]
                if group:
                    self.norm_groups.append(group)
                if any(t.dim() != net.seed_dims + 1 for t in group):
                    raise ValueError(
                        f"norms[{i}]: gain and offset must be [*seed, n] with seed_dims="
                        f"{net.seed_dims}, got shapes {[tuple(t.shape) for t in group]}"
                    )
        for t in [*weights, *(t for g in self.norm_groups for t in g)]:
            if net.seed_dims and t.shape[0] != seeds:
                raise ValueError(f"a tensor of shape {tuple(t.shape)} does not hold {seeds} seeds")
        with torch.no_grad():
            self._weight_norms = FollowedTensors(
                self._projected, lambda w: self._norm([w.detach()]), "initial_weight_norms"
            )
            self.initial_norm_norms = [self._norm(g) for g in self.norm_groups]
        for kind, values in (
            ("weight", self.initial_weight_norms),
            ("normalisation gain and offset", self.initial_norm_norms),
        ):
            for i, n in enumerate(values):
                if not bool((n > 0).all()):
                    raise ValueError(
                        f"{kind} {i} has norm 0 at initialisation: projecting it would hold it at 0"
                    )

    def _projected(self) -> list[Tensor]:
        """The projected weights of ``net.layers`` now."""
        return [layer.weight for layer in self.net.layers if self.project_head or not layer.head]

    @property
    def weights(self) -> list[Tensor]:
        """The projected weights: those of ``net.layers`` now (the head's with ``project_head``)."""
        return list(self._weight_norms.sync()[0])

    @property
    def initial_weight_norms(self) -> list[Tensor]:
        """The norm, per seed ``[S]``, each of :attr:`weights` is held at."""
        return list(self._weight_norms.sync()[1])

    def _norm(self, tensors: Sequence[Tensor]) -> Tensor:
        return _per_seed_norm(tensors, self.net.seeded)

    @torch.no_grad()
    def project_(self) -> None:
        """Project every weight and every gain-and-offset pair to its initial norm, per seed."""
        weights, weight_norms = self._weight_norms.sync()
        groups = [[w] for w in weights] + self.norm_groups
        targets = [*weight_norms, *self.initial_norm_norms]
        for group, target in zip(groups, targets):
            norm = self._norm(group)
            # a group whose entries are all 0 has no direction to keep: it is left at 0
            scale = torch.where(norm > 0, target / norm, torch.ones_like(norm))
            for t in group:
                seeded = self.net.seeded(t)
                seeded.mul_(scale.view(-1, *([1] * (seeded.dim() - 1))))

    @torch.no_grad()
    def after_backward(self) -> None:
        # a weight new to net.layers is first seen here, before its first step
        self._weight_norms.sync()

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        self.project_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "initial_weight_norms": self._weight_norms.state(),
            "initial_norm_norms": [n.clone() for n in self.initial_norm_norms],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        legacy = state.get("version", 1) < STATE_VERSION
        self._weight_norms.load(state["initial_weight_norms"], legacy=legacy)
        saved, own = state["initial_norm_norms"], self.initial_norm_norms
        if len(saved) != len(own) or any(a.shape != b.shape for a, b in zip(saved, own)):
            raise ValueError(
                f"initial_norm_norms: the state holds {len(saved)} norms of shapes "
                f"{[tuple(a.shape) for a in saved]}, this network {len(own)} of shapes "
                f"{[tuple(b.shape) for b in own]}"
            )
        for dst, src in zip(own, saved):
            dst.copy_(src)
