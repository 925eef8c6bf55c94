"""The MLP benchmarks' learner for methods that the fused trainer does not compute by hand.

:class:`~ppo_cbp.benchmarks.common.Learner` trains stacked MLPs with a hand-written backward
(:mod:`ppo_cbp.nets.stacked_mlp`): fast, but only for the methods it knows (:data:`FUSED_METHODS`).
Every other combination runs here: the S seeds' MLPs (each drawn exactly as
:class:`~ppo_cbp.nets.stacked_mlp.StackedMLP` draws it, layer by layer from the seed's init generator)
stacked into one :class:`~ppo_cbp.nets.stacked_sequential.StackedSequential`, the loss by autograd
(the sum of the seeds' mean losses, so each seed's gradient is its own), a ``torch.optim``
optimizer, and the methods of :mod:`ppo_cbp.plasticity` through their hooks:

    forward -> loss.backward() -> after_backward -> optimizer.step() -> after_step(hidden)

with ``at_task_boundary`` from the benchmark's loop (:meth:`AutogradLearner.task_boundary`).
Both learners have the same interface; :func:`make_learner` picks one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppo_cbp.benchmarks.common import (
    FUSED_METHODS,
    Learner,
    ResolvedMethod,
    make_optimizer,
)
from ppo_cbp.errors import UsageError
from ppo_cbp.init import sample_
from ppo_cbp.nets.activations import LEAKY_RELU_SLOPE
from ppo_cbp.nets.crelu import CReLU
from ppo_cbp.nets.dff import DFF
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.plasticity import suite
from ppo_cbp.plasticity.hooks import Layer, Network
from ppo_cbp.plasticity.injection import InjectableNetwork
from ppo_cbp.seeding import TAG_CBP, TAG_INIT, TAG_NOISE, TAG_REDO, derive_seed

__all__ = ["AutogradLearner", "make_learner", "uses_fused_trainer"]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE),
    "swish": nn.SiLU,
    "linear": nn.Identity,
}


INJECTION_FUSED_WITH = frozenset({"bp", "injection", "l2", "snp", "adam"})
"""The methods plasticity injection (of a head of one or two layers) combines with on the fused
trainer (:mod:`ppo_cbp.benchmarks.fused_injection`); other combinations run here."""


def uses_fused_trainer(method: ResolvedMethod) -> bool:
    """Whether every method of ``method`` is one the fused trainer computes by hand
    (:data:`~ppo_cbp.plasticity.suite.FUSED`, and injection as :data:`INJECTION_FUSED_WITH`
    says)."""
    names = set(method.methods)
    if "injection" in names:
        return names <= INJECTION_FUSED_WITH and method.injection_layers in (1, 2)
    return names <= set(FUSED_METHODS)


def build_mlp(
    sizes: Sequence[int],
    seed: int,
    *,
    activation: str,
    init: str,
    layer_norm: bool,
    crelu: bool = False,
    dff: bool = False,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Sequential:
    """Seed ``seed``'s MLP: ``Linear [LayerNorm] activation ... Linear``, the weights drawn from
    ``init`` layer by layer from the seed's init generator (as :class:`StackedMLP` draws them),
    biases 0. ``crelu``: CReLU as every hidden activation (ReLU's gain), each hidden layer's
    consumer taking twice its width. ``dff``: deep Fourier features (:class:`DFF`,
    ``sin z, cos z``) the same way, with ReLU's gain (as :func:`~ppo_cbp.nets.dff.dff_mlp`)."""
    if crelu and dff:
        raise ValueError("crelu and dff both replace the hidden activation: choose one")
    paired = CReLU if crelu else DFF if dff else None
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, TAG_INIT))
    modules: list[nn.Module] = []
    n_layers = len(sizes) - 1
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        fan_in = paired.outputs_per_unit * n_in if paired and i > 0 else n_in
        linear = nn.Linear(fan_in, n_out, device=device, dtype=dtype)
        hidden = i < n_layers - 1
        with torch.no_grad():
            sample_(linear.weight, init, activation if hidden else "linear", generator=g)
            linear.bias.zero_()
        modules.append(linear)
        if hidden:
            if layer_norm:
                modules.append(nn.LayerNorm(n_out, device=device, dtype=dtype))
            modules.append(paired() if paired else _ACTIVATIONS[activation]())
    return nn.Sequential(*modules)


# The order of the methods' states in checkpoints written before the method suite.
_LEGACY_ORDER = (
    "l2_init",
    "parseval",
    "soft_snp",
    "weight_clipping",
    "nap",
    "cbp",
    "redo",
    "snp_init",
    "head_reset",
    "adam_reset",
    "injection",
)


class AutogradLearner:
    """Stacked MLPs trained by autograd and ``torch.optim`` with any combination of methods.

    The interface of :class:`~ppo_cbp.benchmarks.common.Learner`: :meth:`step`,
    :meth:`units_replaced`, :meth:`task_boundary`, :meth:`new_segment`, ``net.forward`` and
    ``net.weights`` for the metrics, :meth:`state_dict`.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        seeds: Sequence[int],
        method: ResolvedMethod,
        *,
        loss: str,
        activation: str = "relu",
        init: str = "kaiming_uniform",
        device: torch.device,
        dtype: torch.dtype,
    ):
        for name in ("crelu", "dff"):
            if method.uses(name) and activation != "relu":
                raise UsageError(
                    f"--method {method.method}: {name} replaces ReLU, not {activation}"
                )
        if method.uses("injection") and method.injection_layers > 1:
            for name in ("layer_norm", "nap", "crelu", "dff"):
                if method.uses(name):
                    raise UsageError(
                        f"--method {method.method}: an injected head of more than one layer is "
                        f"Linear layers and activations only, without {name}; use "
                        "--injection-layers 1"
                    )
        for name in ("dropout", "online_norm"):
            if method.uses(name):  # this learner's network has neither
                raise UsageError(
                    f"--method {method.method}: {name} runs only on the fused trainer, with "
                    f"{', '.join(n for n in FUSED_METHODS if n not in ('dropout', name))}"
                )
        self.seeds = list(seeds)
        self.method = method
        self.loss = loss
        self.init = init
        nets = [
            build_mlp(
                sizes,
                s,
                activation=activation,
                init=init,
                layer_norm=method.uses("layer_norm") or method.uses("nap"),
                crelu=method.uses("crelu"),
                dff=method.uses("dff"),
                device=device,
                dtype=dtype,
            )
            for s in seeds
        ]
        stacked = StackedSequential(nets).to(device=device, dtype=dtype)
        weights = _weight_layers(stacked)
        self.module: nn.Module = stacked
        if method.uses("injection"):
            self.module = InjectableNetwork(stacked, head_layers=method.injection_layers)
        self.params = list(self.module.parameters())
        self.opt, state_owner = suite.with_trac(
            method.methods, make_optimizer(self.params, method, self.seeds), seed_dims=1
        )
        nonlinearity = "linear" if activation == "linear" else activation
        layers = [
            Layer(
                weight=w,
                bias=b,
                init=init,
                nonlinearity=nonlinearity if i < len(weights) - 1 else "linear",
                head=i == len(weights) - 1,
                name=f"layer{i}",
            )
            for i, (w, b) in enumerate(weights)
        ]
        self.network = Network(layers, self.params, state_owner, seed_dims=1, seeds=self.seeds)
        self.net = _NetView(self.module, self.network, stacked)
        for name, limit in (
            ("head_reset", method.head_reset),
            ("injection", method.injection_layers),
        ):
            if method.uses(name) and limit > len(layers):
                flag = "--" + ("injection_layers" if name == "injection" else name).replace(
                    "_", "-"
                )
                raise UsageError(
                    f"{flag} {limit}: the network has only {len(layers)} weight layers"
                )
        if method.uses("adam_reset") and method.optimizer != "adam":
            raise UsageError(f"--method {method.method}: adam_reset needs adam")
        units = stacked.unit_layers(init) if len(sizes) >= 3 else None
        if (method.uses("cbp") or method.uses("redo")) and not units:
            raise UsageError(f"method {method.method} needs at least one hidden layer")
        stream = "cbp" if method.uses("cbp") else "redo"
        target = suite.Target(
            "",
            self.network,
            module=self.module,
            units=units,
            unit_seeds=[derive_seed(s, TAG_CBP if stream == "cbp" else TAG_REDO) for s in seeds],
            norms=stacked.layer_norms(),
        )
        noise = [
            torch.Generator(device=device).manual_seed(derive_seed(s, TAG_NOISE)) for s in seeds
        ]
        self.methods = suite.build(
            method.methods,
            method.settings(),
            [target],
            init=init,
            noise_generators=noise,
            redo_window=True,
        )
        self.cbp = self.methods.resetters.get("") if method.uses("cbp") else None
        self.redo = self.methods.resetters.get("") if method.uses("redo") else None

    def step(self, x_aug: Tensor, target: Tensor, out: Tensor | None = None) -> list[Tensor]:
        """One step on ``x_aug`` (``[S, B, n_in + 1]``, last column 1): the output before the
        update into ``out``; returns the step's hidden activations."""
        y, hidden = self.module(x_aug[..., :-1].transpose(0, 1))
        if out is not None:
            out.copy_(y.detach())
        batch = x_aug.shape[1]
        if self.loss == "cross_entropy":
            loss = F.cross_entropy(y.flatten(0, 1), target.flatten(), reduction="sum") / batch
        else:
            loss = F.mse_loss(y, target, reduction="sum") / (batch * y.shape[-1])
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            self.methods.after_backward()
            self.opt.step()
            self.methods.after_step(hidden)
        return hidden

    def task_boundary(self) -> None:
        with torch.no_grad():
            self.methods.at_task_boundary()

    def new_segment(self) -> None:
        pass

    def units_replaced(self) -> Tensor:
        """Units replaced so far per seed (``[S]``, int64, host)."""
        if self.cbp is not None:
            return torch.full((len(self.seeds),), self.cbp.num_replaced, dtype=torch.int64)
        if self.redo is not None:
            return self.redo.replaced.cpu()
        return torch.zeros(len(self.seeds), dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": copy.deepcopy(self.module.state_dict()),
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "methods": self.methods.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.opt.load_state_dict(state["optimizer"])
        methods = state["methods"]["methods"]
        if methods and "name" not in methods[0]:  # a checkpoint from before the method suite
            names = [n for n in _LEGACY_ORDER if self.method.uses(n)]
            self.methods.load_entries(
                [(n, "", s) for n, s in zip(names, methods, strict=True)], strict=False
            )
        else:
            self.methods.load_state_dict(state["methods"])


def _weight_layers(module: StackedSequential) -> list[tuple[Tensor, Tensor | None]]:
    """Each Linear layer's stacked ``(weight, bias)``, input side first."""
    layers = (module.layer(i) for i in range(len(module)))
    return [(w, b) for _, _, w, b in layers if w is not None]


class _NetView:
    """What the benchmarks' metrics read of a network, as :class:`StackedMLP` offers it: the
    outputs and hidden features, and the weights of the trained layers (after a plasticity
    injection the head's are the injected branch's)."""

    def __init__(self, module: nn.Module, network: Network, stacked: StackedSequential):
        self.module, self.network, self.stacked = module, network, stacked

    @torch.no_grad()
    def forward(self, x_aug: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Outputs ``[S, B, out]`` and each hidden layer's features, what the next layer reads:
        ``[S, B, units]``, or after a CReLU its ``[S, B, 2 * units]`` outputs
        ``relu(z_i), relu(-z_i)`` (after a DFF ``sin(z_i), cos(z_i)``; :attr:`outputs_per_unit`),
        not the units' activations (``|z| / 2``, ``(|sin z| + |cos z|) / 2``) that the training
        step hands CBP."""
        return self.module(x_aug[..., :-1].transpose(0, 1), features=True)

    @property
    def outputs_per_unit(self) -> list[int]:
        """Per hidden layer, the features of each unit in :meth:`forward`'s (2 for CReLU and
        DFF)."""
        return self.stacked.outputs_per_unit

    def weights(self) -> list[Tensor]:
        return [layer.weight.detach() for layer in self.network.layers]


def make_learner(
    sizes: Sequence[int],
    seeds: Sequence[int],
    method: ResolvedMethod,
    *,
    loss: str,
    activation: str = "relu",
    device: torch.device,
    dtype: torch.dtype,
    state: dict[str, Any] | None = None,
) -> Learner | AutogradLearner:
    """The fused :class:`Learner` where it computes every method, else :class:`AutogradLearner`.

    :param state: the learner state of a checkpoint to resume (loaded into the learner). A
        state with a ``"module"`` entry was written by :class:`AutogradLearner` (LayerNorm,
        NaP, CReLU and DFF ran there before the fused trainer computed them): such a run
        continues on it, as it started.
    """
    written_by_autograd = isinstance(state, dict) and "module" in state
    fused = uses_fused_trainer(method) and not written_by_autograd
    kind = Learner if fused else AutogradLearner
    if written_by_autograd and uses_fused_trainer(method):
        print(
            f"note: this {'+'.join(method.methods)} run was started on the autograd learner "
            "(before the fused trainer computed its methods); it continues there, as it started",
            flush=True,
        )
    elif kind is AutogradLearner:
        print(
            f"note: {'+'.join(method.methods) or 'this method'} runs on the autograd learner, "
            "slower than the fused trainer (which computes every method, but plasticity "
            "injection only of a head of 1 or 2 layers and only with "
            f"{', '.join(sorted(INJECTION_FUSED_WITH - {'bp', 'injection'}))})",
            flush=True,
        )
    learner = kind(
        sizes, seeds, method, loss=loss, activation=activation, device=device, dtype=dtype
    )
    if state is not None:
        learner.load_state_dict(state)
    return learner
