"""The learner of the convolutional benchmarks (Continual ImageNet and class-incremental
CIFAR-100): S seeds' networks trained as one stacked network with SGD (or UPGD, or Kron) plus the
method's operators, and the resolution of the benchmarks' method names.

Each seed's slice of the stacked network, of the optimizer state and of the methods'
randomness follows the trajectory of that seed's network trained alone.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppo_cbp.benchmarks.common import MethodConfig, ResolvedMethod, resolve_method
from ppo_cbp.errors import UsageError
from ppo_cbp.nets.resnet import ResNet18
from ppo_cbp.nets.stacked_resnet import StackedResNet18
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.plasticity import suite
from ppo_cbp.plasticity.hooks import Layer, Network
from ppo_cbp.plasticity.kron import Kron
from ppo_cbp.plasticity.upgd import UPGD
from ppo_cbp.seeding import TAG_CBP, TAG_NOISE, TAG_REDO, derive_seed

PLASTICITY_METHODS = (
    "l2_init",
    "parseval",
    "weight_clipping",
    "snp_init",
    "soft_snp",
    "upgd",
    "kron",
    "trac",
)

"""The methods of :mod:`ppo_cbp.plasticity` that the learner runs on a network whose head is
reset at task boundaries; they combine with a benchmark's own methods (``cbp+l2_init``)."""


def resolve_module_method(
    cfg: MethodConfig, defaults: dict[str, dict[str, Any]], aliases: dict[str, str]
) -> ResolvedMethod:
    """:func:`~ppo_cbp.benchmarks.common.resolve_method` for methods that are variants of a core
    method; the result keeps the variant's name.

    :param cfg: the method's configuration (``cfg.method``: one name, or several joined with
        ``+``).
    :param defaults: each method's default hyperparameters, by name.
    :param aliases: variant name -> its core method (e.g. ``linear -> bp``).
    :return: the resolved method.
    :raises UsageError: for a name that is not in ``defaults``.
    """
    names = [n.strip() for n in str(cfg.method).split("+")]
    for name in names:
        if name not in defaults:
            raise UsageError(
                f"unknown method {name!r} in --method {cfg.method}; expected one of "
                f"{', '.join(defaults)}, or several joined with +"
            )
    # a variant's core method; bp, the plain core, drops out of a combination (its defaults,
    # the step size, stay)
    core = {aliases.get(n, n): defaults[n] for n in names}
    spec = [c for c in core if c != "bp"] or ["bp"]
    plain = {"bp": defaults["bp"]} if "bp" in defaults else {}
    resolved = resolve_method(replace(cfg, method="+".join(spec)), {**plain, **core})
    resolved.method = "+".join(names)
    return resolved


def stack_networks(nets: list[nn.Module]) -> StackedSequential | StackedResNet18:
    """S networks of one architecture as one stacked network.

    :param nets: the networks, one per seed, all ResNet-18s or all ``nn.Sequential``.
    :return: a :class:`~ppo_cbp.nets.stacked_resnet.StackedResNet18` for ResNet-18s, else a
        :class:`~ppo_cbp.nets.stacked_sequential.StackedSequential`.
    """
    if nets and all(isinstance(net, ResNet18) for net in nets):
        return StackedResNet18(nets)
    return StackedSequential(nets)


class StackedLearner:
    """S seeds' networks as one stacked network (:func:`stack_networks`), trained with SGD
    (momentum, coupled L2; UPGD for ``upgd``, Kron for ``kron``, any of them wrapped in TRAC for
    ``trac``) plus the
    method's operators.

    A step is one SGD step of every seed's network at once: the loss is the sum over seeds of
    each seed's mean cross-entropy on its own minibatch, so every seed's slice of the
    parameters and of the momentum follows the trajectory of its network trained alone. After
    the optimizer step, Shrink & Perturb adds ``N(0, noise_std^2)`` to every parameter (seed
    ``s``'s noise drawn from its own generator, parameter by parameter in the order of the
    network's ``parameters()``, as :func:`~ppo_cbp.plasticity.shrink_perturb.perturb_` draws it
    alone); CBP and ReDo run on the hidden activations of the step's forward pass with one
    generator per seed.

    :param nets: the seeds' networks, each initialised as if alone (stacked with
        :func:`stack_networks`).
    :param method: the resolved method: optimizer, step size, weight decay and operators.
    :param seeds: the seeds, one per network; they seed the operators' generators.
    :param momentum: SGD momentum (unused by UPGD and Kron, which keeps its own ``b1``).
    :param init: the initialisation of the units that CBP, ReDo or the plasticity methods
        redraw.
    :param device: where the stacked network and its state live.
    :param dtype: floating dtype of the stacked network.
    :raises ValueError: when ``nets`` and ``seeds`` differ in length.
    """

    def __init__(
        self,
        nets: list[nn.Module],
        method: ResolvedMethod,
        *,
        seeds: list[int],
        momentum: float,
        init: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        if len(nets) != len(seeds):
            raise ValueError(f"{len(seeds)} seeds need {len(seeds)} networks, got {len(nets)}")
        self.net = stack_networks(nets).to(device=device, dtype=dtype)
        self.seeds = list(seeds)
        self.method = method
        self.device = device
        self._params = list(self.net.parameters())
        if method.optimizer == "upgd":
            self.opt = UPGD(
                self._params,
                lr=method.lr,
                weight_decay=method.weight_decay,
                beta_utility=method.upgd_beta_utility,
                sigma=method.upgd_sigma,
                seed_dims=1,
                seeds=seeds,
            )
        elif method.optimizer == "kron":
            self.opt = Kron(
                self._params,
                lr=method.lr,
                b1=method.kron_b1,
                weight_decay=method.weight_decay,
                precond_lr=method.kron_precond_lr,
                max_size_triangular=method.kron_max_size_triangular,
                seed_dims=1,
                seeds=seeds,
            )
        else:
            self.opt = torch.optim.SGD(
                self._params, lr=method.lr, momentum=momentum, weight_decay=method.weight_decay
            )
        self.opt, state_owner = suite.with_trac(method.methods, self.opt, seed_dims=1)
        stream = TAG_CBP if method.uses("cbp") else TAG_REDO
        units = self.net.unit_layers(init) if method.uses("cbp") or method.uses("redo") else None
        target = suite.Target(
            "",
            network_of(self.net, state_owner, init, seeds),
            units=units,
            unit_seeds=[derive_seed(s, stream) for s in seeds],
        )
        self.methods = suite.build(
            [n for n in method.methods if n in suite.ORDER],
            method.settings(),
            [target],
            init=init,
            noise_generators=[
                torch.Generator(device=device).manual_seed(derive_seed(s, TAG_NOISE)) for s in seeds
            ],
        )
        self.cbp = self.methods.resetters.get("") if method.uses("cbp") else None
        self.redo = self.methods.resetters.get("") if method.uses("redo") else None

    def step(self, x: Tensor, y: Tensor, num_logits: int | None = None) -> Tensor:
        """One SGD step of every seed on its minibatch.

        :param x: the minibatches, ``[B, S, ...]`` (seed ``s``'s images in ``x[:, s]``).
        :param y: the labels, ``[S, B]``.
        :param num_logits: only the first ``num_logits`` outputs enter the loss and the
            prediction (all when None).
        :return: the correct predictions per seed before the update, ``[S]`` int64 on the
            device.
        """
        logits, hidden = self.net(x)
        if num_logits is not None:
            logits = logits[..., :num_logits]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            self.methods.after_backward()
        self.opt.step()
        with torch.no_grad():
            self.methods.after_step(hidden)
            return (logits.argmax(-1) == y).sum(1)

    def task_boundary(self) -> None:
        """Run the methods' task-boundary hooks (a new task or increment begins)."""
        with torch.no_grad():
            self.methods.at_task_boundary()

    def set_lr(self, lr: float) -> None:
        """Set the optimizer's step size.

        :param lr: the new step size, for every parameter group.
        """
        for group in self.opt.param_groups:
            group["lr"] = lr

    def units_replaced(self) -> list[int]:
        """Units replaced so far by CBP or ReDo (a host read).

        :return: one count per seed (zeros without CBP or ReDo).
        """
        if self.cbp is not None:
            return [self.cbp.num_replaced] * len(self.seeds)
        if self.redo is not None:
            return self.redo.replaced.tolist()
        return [0] * len(self.seeds)

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The optimizer's momentum of a parameter.

        :param p: a parameter of :attr:`net`.
        :return: its momentum buffer, or None when it has none (yet).
        """
        return self.opt.state.get(p, {}).get("momentum_buffer")

    def state_dict(self) -> dict[str, Any]:
        """The learner's state for a checkpoint.

        :return: copies of the network's and optimizer's state, CBP's or ReDo's state, the
            noise generators' states and the plasticity methods' state.
        """
        return {
            "net": copy.deepcopy(self.net.state_dict()),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "methods": self.methods.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state :meth:`state_dict` returned.

        :param state: the learner's state (also as written before the method suite: CBP's,
            ReDo's and the noise's states under their own keys).
        """
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        methods = state.get("methods", {"methods": []})["methods"]
        if "cbp" not in state:
            self.methods.load_state_dict(state["methods"])
            return
        # a checkpoint from before the method suite
        legacy = [n for n in _LEGACY_ORDER if self.method.uses(n)]
        entries = [(n, "", s) for n, s in zip(legacy, methods, strict=False)]
        for name in ("cbp", "redo"):
            if state[name] is not None:
                entries.append((name, "", state[name]))
        if state["noise"]:
            entries.append(("snp", "", {"generators": state["noise"]}))
        self.methods.load_entries(entries, strict=False)


# The order of the methods' states in checkpoints written before the method suite.
_LEGACY_ORDER = ("l2_init", "parseval", "soft_snp", "weight_clipping", "snp_init")


def network_of(
    net: StackedSequential | StackedResNet18,
    optimizer: torch.optim.Optimizer,
    init: str,
    seeds: list[int],
) -> Network:
    """What the plasticity methods see of the stacked network: its weight layers (the last one
    the head, each drawn from ``init`` with ReLU's gain) and every parameter.

    :param net: the stacked network (a ResNet-18's layers are not listed: the methods that
        read layers do not run on it).
    :param optimizer: the optimizer whose state the methods reset.
    :param init: the initialisation of the units that the methods redraw.
    :param seeds: the seeds, one per network of the stack.
    """
    weights = [net.layer(i) for i in range(len(net))] if hasattr(net, "layer") else []
    layers = [(w, b) for _, _, w, b in weights if w is not None]
    return Network(
        [
            Layer(w, b, init, "relu", head=i == len(layers) - 1, name=f"layer{i}")
            for i, (w, b) in enumerate(layers)
        ],
        list(net.parameters()),
        optimizer,
        seed_dims=1,
        seeds=seeds,
    )


@torch.no_grad()
def reset_head_(learner: StackedLearner) -> None:
    """Zero the output layer's weight and bias, and their SGD momentum, in every seed.

    :param learner: the learner whose head is reset.
    """
    for p in learner.net.head():
        if p is None:
            continue
        p.zero_()
        buf = learner.momentum_buffer(p)
        if buf is not None:
            buf.zero_()


@torch.no_grad()
def count_correct_per_seed(net: StackedSequential, x: Tensor, y: Tensor, batch: int) -> Tensor:
    """Correct predictions per seed of ``net``, in chunks.

    :param net: the stacked network.
    :param x: the inputs, ``[N, S, ...]``.
    :param y: the labels, ``[N]``, the same for every seed.
    :param batch: the chunk size (it does not change the result).
    :return: the counts, ``[S]`` int64 on the device.
    """
    correct = torch.zeros(net.num_seeds, dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], batch):
        logits, _ = net(x[i : i + batch])
        correct += (logits.argmax(-1) == y[i : i + batch]).sum(1)
    return correct
