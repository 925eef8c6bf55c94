"""Plasticity injection (Nikishin, Oh, Ostrovski, Lyle, Pascanu, Dabney and Barreto, "Deep
Reinforcement Learning with Plasticity Injection", NeurIPS 2023).

The network is split as ``f(x) = h_theta(phi(x))``: a body ``phi`` (the paper's encoder) and a
head ``h_theta``, here its last ``head_layers`` weight layers. An injection freezes ``theta``
and adds two copies of a freshly initialised head, a trainable ``theta'`` and a frozen
``theta'_0 = theta'`` (the paper's Expression 1):

    f(x) = h_theta(phi(x)) + h_theta'(phi(x)) - h_theta'_0(phi(x))

so the output is unchanged at the injection instant and the number of trained parameters too,
while ``phi`` keeps training on the gradients of all three heads.

:class:`InjectableNetwork` wraps a network (built with it, so that a checkpoint always names the
same modules) and :class:`PlasticityInjection` injects into it, through the hooks of
:mod:`ppo_cbp.plasticity.hooks`, and keeps the optimizer and the method's
:class:`~ppo_cbp.plasticity.hooks.Network` in step with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppo_cbp.init import check_scheme, distribution, fans, sample
from ppo_cbp.nets.stacked_sequential import ELEMENTWISE, StackedSequential
from ppo_cbp.nets.units import leaf_modules
from ppo_cbp.plasticity.hooks import Layer, Network, PlasticityMethod, generators_for
from ppo_cbp.seeding import INJECTION_TAGS, TAG_INJECTION

__all__ = ["InjectableNetwork", "PlasticityInjection", "draw_head"]

# The head's modules: weight layers and the elementwise activations between them.
_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
# Marks the optimizer's group of a method's trainable branch, by the method's tag.
_GROUP_KEY = "plasticity_injection"

WeightAndBias = tuple[Tensor, Tensor | None]


class _Branch(nn.Module):
    """One injected head: the head's Linear layers (``weights[j]`` ``[*seed, out, in]``) and
    activations, with parameters of its own."""

    def __init__(
        self,
        activations: Sequence[nn.Module | None],
        weights: Sequence[Tensor],
        biases: Sequence[Tensor | None],
        *,
        trainable: bool,
        seed_dims: int,
    ):
        super().__init__()
        # None at a Linear's position, the (parameter-free, shared) activation elsewhere
        self._activations = list(activations)
        self._seed_dims = seed_dims
        self.weights = nn.ParameterList(
            [nn.Parameter(w.detach().clone(), requires_grad=trainable) for w in weights]
        )
        self._has_bias = [b is not None for b in biases]
        self.biases = nn.ParameterList(
            [
                nn.Parameter(b.detach().clone(), requires_grad=trainable)
                for b in biases
                if b is not None
            ]
        )

    def layers(self) -> list[WeightAndBias]:
        out: list[WeightAndBias] = []
        biases = iter(self.biases)
        for w, has_bias in zip(self.weights, self._has_bias, strict=True):
            out.append((w, next(biases) if has_bias else None))
        return out

    def forward(self, h: Tensor) -> Tensor:
        layers = iter(self.layers())
        for activation in self._activations:
            if activation is not None:
                h = activation(h)
                continue
            w, b = next(layers)
            if not self._seed_dims:
                h = F.linear(h, w, b)
            elif b is None:  # [S, B, in] @ [S, in, out], as StackedSequential runs a Linear
                h = torch.bmm(h, w.transpose(1, 2))
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        return h


class InjectableNetwork(nn.Module):
    """A network whose head can take plasticity injections (see the module docstring).

    Until the first injection it computes exactly what ``net`` does. After ``n`` injections
    its output is ``h_theta(phi(x)) + sum_i (h_theta'_i(phi(x)) - h_theta'_i0(phi(x)))``: only
    the latest ``theta'_n`` (and ``phi``) train; an injection freezes the branch that trained
    before it, so the whole current head plays the paper's ``theta``. The difference of a
    branch and its frozen copy is added last, so at its injection it adds an exact 0 and the
    output does not change by a rounding.

    The number of injections is in the state dict (``_extra_state``), so loading a state dict
    into a network built afresh rebuilds the branches before their parameters are loaded.

    :param net: an ``nn.Sequential`` (nested ones are flattened; its forward returns the output)
        or a :class:`~ppo_cbp.nets.stacked_sequential.StackedSequential` of S seeds (its forward
        takes ``[B, S, features]`` and returns ``([S, B, out], hidden)``; the hidden
        activations are the network's own, those of the original head ``theta`` included,
        not the branches').
    :param head_layers: the head is the last ``head_layers`` weight layers: Linear layers and
        elementwise activations only (a convolution or Flatten is left in the body).
        Default 2: the head of the paper's Atari agent (Double DQN on the Nature-DQN
        network) is its two fully connected layers, on top of the convolutional encoder,
        as the PyTorch reimplementation timoklein/plasticity-injection-torch has it.
    """

    def __init__(self, net: nn.Sequential | StackedSequential, head_layers: int = 2):
        super().__init__()
        if isinstance(head_layers, bool) or not isinstance(head_layers, int) or head_layers < 1:
            raise ValueError(f"head_layers must be a positive integer, got {head_layers!r}")
        if isinstance(net, StackedSequential):
            modules = [net.layer(i) for i in range(len(net))]
            kinds = [kind for kind, _, _, _ in modules]
            stateless = [m for _, m, _, _ in modules]
            params = [(w, b) for _, _, w, b in modules]
            self.seed_dims, self.num_seeds = 1, net.num_seeds
        elif isinstance(net, nn.Sequential):
            leaves = leaf_modules(net)
            kinds = [type(m) for m in leaves]
            stateless = list(leaves)
            params = [
                (m.weight, m.bias) if isinstance(m, _WEIGHT_LAYERS) else (None, None)
                for m in leaves
            ]
            self.seed_dims, self.num_seeds = 0, 1
            self._leaves = leaves
        else:
            raise ValueError(
                f"expected an nn.Sequential or a StackedSequential, got {type(net).__name__}"
            )
        weight_positions = [i for i, (w, _) in enumerate(params) if w is not None]
        if head_layers > len(weight_positions):
            raise ValueError(
                f"head_layers = {head_layers}, but the network has {len(weight_positions)} "
                "weight layers"
            )
        self.cut = weight_positions[-head_layers]
        self.head_layers = head_layers
        self._activations: list[nn.Module | None] = []
        for kind, module in zip(kinds[self.cut :], stateless[self.cut :], strict=True):
            if kind is nn.Linear:
                self._activations.append(None)
            elif issubclass(kind, ELEMENTWISE):
                self._activations.append(module)
            else:
                raise ValueError(
                    f"the head (the last {head_layers} weight layers) may hold only Linear "
                    f"layers and elementwise activations, not {kind.__name__}"
                )
        self._head: list[WeightAndBias] = [p for p in params[self.cut :] if p[0] is not None]
        self.net = net
        self.trainable = nn.ModuleList()
        self.frozen = nn.ModuleList()

    @property
    def injections(self) -> int:
        """The number of injections so far."""
        return len(self.trainable)

    def head(self) -> list[WeightAndBias]:
        """The original head ``theta``: each layer's weight and bias, input side first."""
        return list(self._head)

    def trainable_head(self) -> list[WeightAndBias]:
        """The head's layers that train now: ``theta`` before any injection, else the latest
        branch ``theta'``."""
        return self.trainable[-1].layers() if self.injections else self.head()

    def frozen_parameters(self) -> list[Tensor]:
        """``theta``, every branch's frozen copy and every branch but the latest (none before
        the first injection)."""
        if not self.injections:
            return []
        parts = [self.head(), *(b.layers() for b in self.frozen)]
        parts += [b.layers() for b in self.trainable[:-1]]
        return [t for layers in parts for wb in layers for t in wb if t is not None]

    def branch_parameters(self) -> list[Tensor]:
        """Every parameter the injections added, trainable or frozen."""
        return [*self.trainable.parameters(), *self.frozen.parameters()]

    @torch.no_grad()
    def inject_(self, weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> None:
        """Freeze the trainable head and add the branch ``theta'`` of these values (one per
        head layer, shaped as the head's) with its frozen copy ``theta'_0``."""
        shapes = [(w.shape, None if b is None else b.shape) for w, b in self._head]
        new_shapes = [(w.shape, None if b is None else b.shape) for w, b in zip(weights, biases)]
        if len(weights) != len(biases) or new_shapes != shapes:
            raise ValueError(f"the branch's layers must have the head's shapes {shapes}")
        for w, b in self.trainable_head():
            for t in (w, b):
                if t is not None:
                    t.requires_grad_(False)
                    t.grad = None
        kwargs = dict(seed_dims=self.seed_dims)
        self.trainable.append(_Branch(self._activations, weights, biases, trainable=True, **kwargs))
        self.frozen.append(_Branch(self._activations, weights, biases, trainable=False, **kwargs))

    def rebuild_(self, injections: int) -> None:
        """Grow to ``injections`` injections with placeholder branches (zeros), for a state dict
        to be loaded into; an injected network cannot go back."""
        if isinstance(injections, bool) or not isinstance(injections, int) or injections < 0:
            raise ValueError(f"injections must be a non-negative integer, got {injections!r}")
        if injections < self.injections:
            raise ValueError(
                f"the network has {self.injections} injections; the state has only {injections}"
            )
        while self.injections < injections:
            self.inject_(
                [torch.zeros_like(w) for w, _ in self._head],
                [None if b is None else torch.zeros_like(b) for _, b in self._head],
            )

    def get_extra_state(self) -> dict[str, int]:
        return {"injections": self.injections}

    def set_extra_state(self, state: dict[str, int]) -> None:
        # load_state_dict calls this before it loads the children: the branches it adds here
        # then receive their saved parameters
        self.rebuild_(state["injections"])

    def _body_and_head(
        self, x: Tensor, tap_features: bool = False
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``phi(x)``, ``h_theta(phi(x))`` and the network's hidden activations."""
        if self.seed_dims:
            if self.cut == 0:
                out, hidden = self.net(x, features=tap_features)
                return x.transpose(0, 1), out, hidden
            features, hidden = self.net(x, stop=self.cut, features=tap_features)
            out, head_hidden = self.net(features, start=self.cut, features=tap_features)
            return features, out, hidden + head_hidden
        h = x
        for m in self._leaves[: self.cut]:
            h = m(h)
        features = h
        for m in self._leaves[self.cut :]:
            h = m(h)
        return features, h, []

    def forward(self, x: Tensor, *, features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The output (and, stacked, the hidden activations); ``features``: a stacked network's
        hidden features instead (:meth:`StackedSequential.forward`)."""
        if features and not self.seed_dims:
            raise ValueError("features=True needs a StackedSequential network")
        if not self.injections:
            return self.net(x, features=True) if features else self.net(x)
        phi, out, hidden = self._body_and_head(x, features)
        for trainable, frozen in zip(self.trainable, self.frozen, strict=True):
            out = out + (trainable(phi) - frozen(phi))
        return (out, hidden) if self.seed_dims else out

    def as_network(
        self,
        optimizer: torch.optim.Optimizer | None,
        *,
        init: str,
        seeds: Sequence[int],
        nonlinearity: str = "relu",
    ) -> Network:
        """The :class:`~ppo_cbp.plasticity.hooks.Network` of this network: its weight layers
        (every one drawn from ``init`` with the gain of ``nonlinearity``, as the project's
        builders draw them, the output layer included), every parameter and ``optimizer``."""
        check_scheme(init)
        if len(seeds) != self.num_seeds:
            raise ValueError(f"{self.num_seeds} seeds expected, got {len(seeds)}")
        if self.seed_dims:
            weights = [self.net.layer(i)[2:] for i in range(len(self.net))]
        else:
            weights = [(m.weight, m.bias) for m in self._leaves if isinstance(m, _WEIGHT_LAYERS)]
        weights = [(w, b) for w, b in weights if w is not None]
        layers = [
            Layer(w, b, init, nonlinearity, head=i == len(weights) - 1, name=f"layer{i}")
            for i, (w, b) in enumerate(weights)
        ]
        return Network(
            layers,
            [p for p in self.parameters() if p.requires_grad],
            optimizer,
            seed_dims=self.seed_dims,
            seeds=list(seeds),
        )


def draw_head(
    layers: Sequence[tuple[Tensor, Tensor | None, str, str]],
    generators: Sequence[torch.Generator],
    *,
    seed_dims: int,
    bias: str = "zero",
) -> tuple[list[Tensor], list[Tensor | None]]:
    """A fresh head shaped like ``layers`` (each ``(weight, bias or None, init scheme,
    nonlinearity)``, stacked along ``seed_dims``): per seed from its generator, layer by layer,
    the weight from the scheme with the nonlinearity's gain, then the bias, 0 or (``bias=
    "torch_default"``) PyTorch's ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. What an injection
    draws, on either trainer."""
    per_seed: list[list[tuple[Tensor, Tensor | None]]] = []
    for g in generators:
        drawn = []
        for w, b, init, nonlinearity in layers:
            shape = tuple(w.shape[seed_dims:])
            fan_in, fan_out = fans(shape)
            kind, scale = distribution(init, nonlinearity, fan_in, fan_out)
            new_w = sample(shape, kind, scale, generator=g, device=w.device, dtype=w.dtype)
            new_b = None
            if b is not None:
                b_shape = tuple(b.shape[seed_dims:])
                if bias == "torch_default":
                    bound = 1.0 / math.sqrt(fan_in)
                    new_b = sample(
                        b_shape, "uniform", bound, generator=g, device=b.device, dtype=b.dtype
                    )
                else:
                    new_b = torch.zeros(b_shape, device=b.device, dtype=b.dtype)
            drawn.append((new_w, new_b))
        per_seed.append(drawn)
    if not seed_dims:
        return [w for w, _ in per_seed[0]], [b for _, b in per_seed[0]]
    stacked = list(zip(*per_seed, strict=True))
    weights = [torch.stack([w for w, _ in seeds]) for seeds in stacked]
    biases = [
        None if seeds[0][1] is None else torch.stack([b for _, b in seeds]) for seeds in stacked
    ]
    return weights, biases


class PlasticityInjection(PlasticityMethod):
    """Plasticity injection (Nikishin et al., NeurIPS 2023, Expression 1) into an
    :class:`InjectableNetwork`.

    An injection turns the network's output ``h_theta(phi(x))`` into

        h_theta(phi(x)) + h_theta'(phi(x)) - h_theta'_0(phi(x)),

    ``theta`` (the trainable head: the last ``head_layers`` weight layers, or the branch of the
    previous injection) frozen, ``theta'`` drawn afresh from each head layer's own scheme
    (``Layer.init`` with the gain of ``Layer.nonlinearity``, :mod:`ppo_cbp.init`; biases 0, or
    PyTorch's default with ``bias="torch_default"``) and trained, ``theta'_0 = theta'`` frozen.
    The body ``phi`` keeps training with its optimizer state.

    The optimizer: the frozen parameters leave its groups and their state is dropped (so no
    weight decay, momentum or Adam moments move them); ``theta'`` joins in a group of its own
    (the hyperparameters of the head's group, marked with this method's ``tag``) with no state,
    so Adam starts it at step 0. The body's optimizer state is kept, as in the paper (whose
    appendix ablates resetting the optimizer at injection). ``net.parameters`` and
    ``net.layers`` follow: the frozen parameters leave them, and the head's layers become the
    branch's (so no other method touches a frozen weight).

    When: the paper injects once, partway through training (its Atari agents, a single time in
    200M frames); call :meth:`inject` then. ``at_task_boundaries=True`` injects at every task
    boundary instead (a continual-learning variant), at most ``max_injections`` times in all
    (1: once, at the first boundary). :attr:`injections` counts them.

    Per seed: seed ``s``'s ``theta'`` comes from its own generator (stream ``tag`` of
    :func:`~ppo_cbp.plasticity.hooks.generators_for`), layer by layer, weight then bias, so a
    stack of S seeds draws what each seed's network draws alone.

    Checkpoints: :meth:`state_dict` holds the number of injections and the generators. To
    resume, load the module's state dict or this method's (either rebuilds the branches a
    network built afresh lacks), then the optimizer's: a load pre-hook first regroups the
    optimizer as the injections left it, so its saved state fits. The optimizer cannot be
    loaded before both (its groups do not match yet).

    :param module: the network to inject into.
    :param net: its :class:`~ppo_cbp.plasticity.hooks.Network` (``module.as_network(...)``); the
        head's weights must be among ``net.layers``, where their schemes are read.
    :param at_task_boundaries: inject at each :meth:`at_task_boundary`.
    :param max_injections: at most this many injections at task boundaries (None: no limit).
    :param bias: ``"zero"`` (this project's networks) or ``"torch_default"`` for the fresh biases.
    :param tag: the random stream, one of :data:`~ppo_cbp.seeding.INJECTION_TAGS`; networks that
        share an optimizer need different tags.
    """

    name = "plasticity_injection"

    def __init__(
        self,
        module: InjectableNetwork,
        net: Network,
        *,
        at_task_boundaries: bool = False,
        max_injections: int | None = None,
        bias: str = "zero",
        tag: int = TAG_INJECTION,
    ):
        if not isinstance(module, InjectableNetwork):
            raise ValueError(f"module must be an InjectableNetwork, got {type(module).__name__}")
        if net.seed_dims != module.seed_dims or net.num_seeds != module.num_seeds:
            raise ValueError(
                f"the Network has seed_dims={net.seed_dims} and {net.num_seeds} seeds; the "
                f"module {module.seed_dims} and {module.num_seeds}"
            )
        if max_injections is not None and (
            isinstance(max_injections, bool)
            or not isinstance(max_injections, int)
            or max_injections < 1
        ):
            raise ValueError(
                f"max_injections must be a positive integer or None, got {max_injections!r}"
            )
        if bias not in ("zero", "torch_default"):
            raise ValueError(f"unknown bias init {bias!r}; expected 'zero' or 'torch_default'")
        if isinstance(tag, bool) or tag not in INJECTION_TAGS:
            raise ValueError(
                f"tag must be in {INJECTION_TAGS.start}..{INJECTION_TAGS.stop - 1}, got {tag!r}"
            )
        positions = []
        for w, _ in module.head():
            found = [i for i, layer in enumerate(net.layers) if layer.weight is w]
            if not found:
                raise ValueError("net.layers must list the head's layers (module.as_network)")
            positions.append(found[0])
        for i in positions:  # an unknown scheme or nonlinearity fails here, not at injection
            distribution(net.layers[i].init, net.layers[i].nonlinearity, 1, 1)
        opt = net.optimizer
        if opt is not None and not module.injections:
            head_ids = {id(t) for wb in module.head() for t in wb if t is not None}
            if not any(id(p) in head_ids for g in opt.param_groups for p in g["params"]):
                raise ValueError("the optimizer does not train the network's head")
        self.module = module
        self.net = net
        self.at_task_boundaries = bool(at_task_boundaries)
        self.max_injections = max_injections
        self.bias = bias
        self.tag = tag
        self._positions = positions
        self._head_layers = [net.layers[i] for i in positions]
        self.generators = generators_for(net, tag)
        if net.optimizer is not None:
            net.optimizer.register_load_state_dict_pre_hook(lambda *_: self._sync())
        self._sync()

    @property
    def injections(self) -> int:
        """The number of injections so far."""
        return self.module.injections

    def inject(self) -> None:
        """Inject now: freeze the trainable head and add a fresh ``theta'`` and its copy."""
        weights, biases = self._draw()
        self.module.inject_(weights, biases)
        self._sync()

    def at_task_boundary(self) -> None:
        if self.at_task_boundaries and (
            self.max_injections is None or self.injections < self.max_injections
        ):
            self.inject()

    def state_dict(self) -> dict[str, Any]:
        return {
            "injections": self.injections,
            "generators": [g.get_state() for g in self.generators],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["generators"]) != len(self.generators):
            raise ValueError(
                f"the state has {len(state['generators'])} generators for "
                f"{len(self.generators)} seeds"
            )
        self.module.rebuild_(state["injections"])
        for g, s in zip(self.generators, state["generators"], strict=True):
            g.set_state(s)
        self._sync()

    def _draw(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """A fresh ``theta'`` (:func:`draw_head`)."""
        head = [
            (w, b, layer.init, layer.nonlinearity)
            for (w, b), layer in zip(self.module.head(), self._head_layers, strict=True)
        ]
        return draw_head(head, self.generators, seed_dims=self.module.seed_dims, bias=self.bias)

    def _sync(self) -> None:
        """Bring the optimizer's groups, ``net.parameters`` and ``net.layers`` in line with the
        module's injections (idempotent: after an injection, or a reload into a fresh run)."""
        m = self.module
        if not m.injections:
            return
        frozen = m.frozen_parameters()
        trainable_layers = m.trainable_head()
        trainable = [t for wb in trainable_layers for t in wb if t is not None]
        frozen_ids = {id(p) for p in frozen}
        moved_ids = frozen_ids | {id(p) for p in m.branch_parameters()}
        for p in frozen:
            p.grad = None
        net = self.net
        net.parameters[:] = [p for p in net.parameters if id(p) not in moved_ids] + trainable
        for i, original, (w, b) in zip(
            self._positions, self._head_layers, trainable_layers, strict=True
        ):
            net.layers[i] = Layer(
                w,
                b,
                original.init,
                original.nonlinearity,
                head=original.head,
                name=f"{original.name}+injection{m.injections}",
            )
        opt = net.optimizer
        if opt is None:
            return
        head_ids = {id(t) for wb in m.head() for t in wb if t is not None} | {
            id(p) for p in trainable
        }
        own = [g for g in opt.param_groups if g.get(_GROUP_KEY) == self.tag]
        template = next(
            (g for g in opt.param_groups if any(id(p) in head_ids for p in g["params"])), None
        )
        for g in opt.param_groups:
            if g.get(_GROUP_KEY) != self.tag:
                g["params"] = [p for p in g["params"] if id(p) not in moved_ids]
        for p in frozen:
            opt.state.pop(p, None)
        if own:
            own[0]["params"] = trainable
        else:
            if template is None:
                raise ValueError("the optimizer does not train the network's head")
            settings = {k: v for k, v in template.items() if k not in ("params", _GROUP_KEY)}
            opt.add_param_group({**settings, "params": trainable, _GROUP_KEY: self.tag})
        # groups of several networks' injections in one order, whichever injected first
        opt.param_groups.sort(key=lambda g: -1 if g.get(_GROUP_KEY) is None else g[_GROUP_KEY])
