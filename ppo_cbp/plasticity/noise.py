"""Shrink & Perturb's perturbation (Ash and Adams, 2020, "On Warm-Starting Neural Network
Training", NeurIPS), as the loss-of-plasticity paper runs it: after every optimizer step,

    theta <- theta + noise_std * xi,   xi ~ N(0, 1) independently for every parameter entry,

with the *shrink* half being the optimizer's coupled L2 weight decay (``weight_decay``).
Default ``noise_std``: the paper's, 1e-5 for PPO (the official code's Ant configuration); the
supervised benchmarks state theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.plasticity.hooks import Network, PlasticityMethod
from ppo_cbp.plasticity.resets import set_generator_states

__all__ = ["PerturbNoise"]


class PerturbNoise(PlasticityMethod):
    """Add ``N(0, noise_std^2)`` to every trained parameter of ``networks`` after each step.

    The draws, from ``generators`` (one per stacked seed), in a fixed layout:

    * unstacked networks (``seed_dims=0``, one generator): parameter by parameter, the
      networks' ``parameters`` in order, each drawn with its own shape
      (:func:`~ppo_cbp.plasticity.shrink_perturb.perturb_`'s draws, which PPO has always used);
    * stacked networks (``seed_dims=1``): seed ``s`` draws one vector from its generator, laid
      out layer by layer as the layer's ``[out, fan_in + 1]`` matrix ``[W | b]`` (row-major;
      ``[out, fan_in]`` without a bias), then every other parameter (norm gains, ...) in
      order: the fused MLP trainer's layout, so both trainers add the same noise, and a stack
      of S seeds draws what each seed draws alone.

    Parameters are read from the networks when the noise is added: an injection's frozen
    parameters, which leave ``Network.parameters``, get none.

    :param networks: the networks (all with the same ``seed_dims`` and seeds).
    :param noise_std: the standard deviation, >= 0.
    :param generators: one per stacked seed (one for unstacked networks).
    """

    name = "snp"

    def __init__(
        self, networks: Sequence[Network], noise_std: float, generators: Sequence[torch.Generator]
    ):
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.networks = list(networks)
        self.noise_std = float(noise_std)
        self.generators = list(generators)
        self.seed_dims = self.networks[0].seed_dims
        expected = self.networks[0].num_seeds if self.seed_dims else 1
        if len(self.generators) != expected:
            raise ValueError(f"{expected} generator(s) expected, got {len(self.generators)}")
        self._buffer: Tensor | None = None

    def _parameters(self) -> list[Tensor]:
        return [p for net in self.networks for p in net.parameters]

    @torch.no_grad()
    def after_step(self, hidden: Sequence[Tensor]) -> None:
        if self.noise_std == 0:
            return
        params = self._parameters()
        if not self.seed_dims:
            g = self.generators[0]
            noise = [
                torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) for p in params
            ]
            torch._foreach_add_(params, noise, alpha=self.noise_std)
            return
        # [W | b] blocks of the layers, then the other parameters, as flat per-seed slices
        blocks: list[tuple[Tensor, Tensor | None]] = []
        seen: set[int] = set()
        for net in self.networks:
            for layer in net.layers:
                blocks.append((layer.weight, layer.bias))
                seen.update(id(t) for t in (layer.weight, layer.bias) if t is not None)
        others = [p for p in params if id(p) not in seen]
        total = sum(w[0].numel() + (0 if b is None else b[0].numel()) for w, b in blocks)
        total += sum(p[0].numel() for p in others)
        first = params[0]
        S = first.shape[0]
        if self._buffer is None or self._buffer.shape != (S, total):
            self._buffer = torch.empty(S, total, device=first.device, dtype=first.dtype)
        buf = self._buffer
        for s, g in enumerate(self.generators):
            torch.randn(total, generator=g, out=buf[s])
        offset, alpha = 0, self.noise_std
        for w, b in blocks:
            rows = w.shape[1]
            fan_in = w[0].numel() // rows
            width = fan_in + (b is not None)
            block = buf[:, offset : offset + rows * width].view(S, rows, width)
            w.add_(block[..., :fan_in].reshape(w.shape), alpha=alpha)
            if b is not None:
                b.add_(block[..., fan_in], alpha=alpha)
            offset += rows * width
        for p in others:
            n = p[0].numel()
            p.add_(buf[:, offset : offset + n].view(p.shape), alpha=alpha)
            offset += n

    def state_dict(self) -> dict[str, Any]:
        return {"generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_states(self.generators, state["generators"])
