"""An optimizer over stacked seeds with one generator per seed, the base of UPGD and Kron.

With ``seed_dims=1`` every parameter is ``[S, ...]``, slice ``s`` seed ``s``'s network; each
seed draws its random numbers from its own generator (``derive_seed(seed, tag)``), so a stack
of S seeds follows each seed's run alone, and the generators' states travel in
``state_dict`` so that a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.seeding import derive_seed

__all__ = ["SeededOptimizer"]


class SeededOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with stacked seeds and per-seed generators.

    :param params: parameters or groups.
    :param defaults: the optimizer's settings.
    :param seed_dims: 0, or 1 for stacked parameters (each ``[S, ...]``).
    :param seeds: one run seed per stacked network (one when ``seed_dims=0``).
    :param tag: the random stream (:mod:`ppo_cbp.seeding`) of the generators.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        seed_dims: int,
        seeds: Sequence[int],
        tag: int,
    ):
        if seed_dims not in (0, 1):
            raise ValueError(f"seed_dims must be 0 or 1, got {seed_dims}")
        seeds = [int(s) for s in seeds]
        if not seeds or (seed_dims == 0 and len(seeds) != 1):
            raise ValueError(f"one seed per stacked network (one when seed_dims=0), got {seeds}")
        super().__init__(params, defaults)
        self.seed_dims = seed_dims
        device = self.param_groups[0]["params"][0].device
        self.generators = [
            torch.Generator(device=device).manual_seed(derive_seed(s, tag)) for s in seeds
        ]
        for group in self.param_groups:
            for p in group["params"]:
                if seed_dims and (p.dim() == 0 or p.shape[0] != len(seeds)):
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)}: not {len(seeds)} seeds"
                    )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generators"] = [g.get_state() for g in self.generators]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators")
        if len(generators) != len(self.generators):
            raise ValueError(
                f"the state has {len(generators)} generators, expected {len(self.generators)}"
            )
        super().load_state_dict(state_dict)
        for g, s in zip(self.generators, generators):
            g.set_state(s)
