"""The plain, one-network learner the stacked learners are tested against: an ``nn.Module``
with torch SGD, hooked CBP/ReDo and Shrink & Perturb's noise (:func:`add_noise_`), each seed's
randomness from the generators its run alone would use."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppo_cbp.benchmarks.common import ResolvedMethod
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.redo import ReDo
from ppo_cbp.seeding import TAG_CBP, TAG_NOISE, TAG_REDO, derive_seed


@torch.no_grad()
def add_noise_(net: nn.Module, std: float, generator: torch.Generator) -> None:
    """Shrink & Perturb's noise in its documented layout (one seed): one draw of
    ``N(0, 1)`` for all entries, laid out over the weight layers as ``[W | b]`` (``[out,
    fan_in + 1]``, row-major) of each Linear or Conv2d of an ``nn.Sequential`` in order, then
    over every other parameter in ``parameters()`` order (a ResNet's: all of them)."""
    layers = []
    if isinstance(net, nn.Sequential):
        layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    in_layers = {id(t) for m in layers for t in (m.weight, m.bias) if t is not None}
    others = [p for p in net.parameters() if id(p) not in in_layers]
    sizes = [m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for m in layers]
    total = sum(sizes) + sum(p.numel() for p in others)
    first = next(net.parameters())
    xi = torch.randn(total, generator=generator, device=first.device, dtype=first.dtype)
    offset = 0
    for m, n in zip(layers, sizes):
        rows = m.weight.shape[0]
        block = xi[offset : offset + n].view(rows, -1)
        m.weight.add_(block[:, : m.weight[0].numel()].reshape(m.weight.shape), alpha=std)
        if m.bias is not None:
            m.bias.add_(block[:, -1], alpha=std)
        offset += n
    for p in others:
        p.add_(xi[offset : offset + p.numel()].view(p.shape), alpha=std)
        offset += p.numel()


class ModuleLearner:
    """An ``nn.Module`` trained with SGD (momentum, coupled L2) plus the method's operator.

    After every optimizer step: Shrink & Perturb adds ``N(0, noise_std^2)`` to every parameter,
    CBP runs :meth:`~ppo_cbp.plasticity.cbp.ContinualBackprop.step` (hooked activations of that step's
    forward pass), ReDo :meth:`~ppo_cbp.plasticity.redo.ReDo.step`. All randomness comes from per-seed
    generators on the device.
    """

    def __init__(
        self,
        net: nn.Module,
        method: ResolvedMethod,
        *,
        seed: int,
        momentum: float,
        init: str,
        device: torch.device,
    ):
        self.net = net.to(device)
        self.method = method
        self.device = device
        self.opt = torch.optim.SGD(
            self.net.parameters(), lr=method.lr, momentum=momentum, weight_decay=method.weight_decay
        )
        self.cbp: ContinualBackprop | None = None
        self.redo: ReDo | None = None
        self.noise: torch.Generator | None = None
        if method.method == "cbp":
            self.cbp = ContinualBackprop(
                self.net,
                self.opt,
                replacement_rate=method.replacement_rate,
                maturity_threshold=method.maturity_threshold,
                decay_rate=method.decay_rate,
                utility=method.utility,
                init=init,
                seed=derive_seed(seed, TAG_CBP),
            )
        elif method.method == "redo":
            self.redo = ReDo(
                self.net,
                self.opt,
                threshold=method.redo_threshold,
                period=method.redo_period,
                init=init,
                seed=derive_seed(seed, TAG_REDO),
            )
        if method.noise_std > 0:
            self.noise = torch.Generator(device=device).manual_seed(derive_seed(seed, TAG_NOISE))
        self._params = [p for p in self.net.parameters()]

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, x: Tensor, y: Tensor, num_logits: int | None = None) -> Tensor:
        """One SGD step on ``(x, y)``; returns the number of correct predictions (device tensor).

        ``num_logits``: only the first ``num_logits`` outputs enter the loss and the prediction
        (the others are masked out).
        """
        logits = self.net(x)
        if num_logits is not None:
            logits = logits[:, :num_logits]
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.noise is not None:
            add_noise_(self.net, self.method.noise_std, self.noise)
        if self.cbp is not None:
            self.cbp.step()
        elif self.redo is not None:
            self.redo.step()
        with torch.no_grad():
            return (logits.argmax(1) == y).sum()

    def units_replaced(self) -> int:
        if self.cbp is not None:
            return self.cbp.num_replaced
        if self.redo is not None:
            return self.redo.num_replaced
        return 0

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        return self.opt.state.get(p, {}).get("momentum_buffer")

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": copy.deepcopy(self.net.state_dict()),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "cbp": None if self.cbp is None else self.cbp.state_dict(),
            "redo": None if self.redo is None else self.redo.state_dict(),
            "noise": None if self.noise is None else self.noise.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        if self.cbp is not None:
            self.cbp.load_state_dict(state["cbp"])
        if self.redo is not None:
            self.redo.load_state_dict(state["redo"])
        if self.noise is not None:
            self.noise.set_state(state["noise"])
