"""Shrink and Perturb (Ash and Adams, 2020), in two forms.

As used in the paper (Dohare et al.): *shrink* is coupled L2 weight decay in the optimizer
(``weight_decay=lambda``, so SGD moves each weight by ``-lr * (grad + lambda * w)``), and
*perturb* adds independent Gaussian noise of standard deviation ``noise_std`` to every parameter
after each optimizer step:

    w <- w + noise_std * N(0, 1)

:func:`perturb_` is the second half; pair it with the optimizer's ``weight_decay``.

Toward a fresh initialisation: :class:`ShrinkPerturb` interpolates every weight layer toward a
new draw from its own init distribution, at task boundaries (Ash and Adams) or after every
update (the "soft" variant of Juliani and Ash, 2024).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ppo_cbp.plasticity.hooks import Network, PlasticityMethod, generators_for
from ppo_cbp.plasticity.resets import fresh_weight, set_generator_states
from ppo_cbp.seeding import TAG_SHRINK_PERTURB

DEFAULT_SHRINK = {"task_boundary": 0.5, "step": 0.999999}
"""The sources' shrink factor per schedule (see :class:`ShrinkPerturb`)."""


@torch.no_grad()
def perturb_(
    params: Iterable[Tensor], noise_std: float, generator: torch.Generator | None = None
) -> None:
    """Add ``N(0, noise_std^2)`` noise to each tensor in ``params``, in place."""
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    params = list(params)
    if noise_std == 0 or not params:
        return
    noise = [
        torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params
    ]
    torch._foreach_add_(params, noise, alpha=noise_std)


class ShrinkPerturb(PlasticityMethod):
    """Shrink toward a fresh initialisation:

        theta <- alpha * theta + (1 - alpha) * theta_fresh

    for every weight of ``net.layers``, with ``theta_fresh`` a *new* draw from the layer's init
    scheme and gain at every application (:func:`~ppo_cbp.plasticity.resets.fresh_weight`:
    seed ``s`` draws its slice from its own generator, stream :data:`~ppo_cbp.seeding.TAG_SHRINK_PERTURB`, one
    whole weight per layer, input side first). Biases start at 0 in this project, so their fresh
    value is 0 and they are only shrunk: ``b <- alpha * b``. Parameters outside ``net.layers``
    (norm gains, a policy's log-std) and the optimizer state are left alone; the layers are
    ``net.layers`` as they are at each application (after a plasticity injection, the trainable
    branch in the head's place, not the frozen head). Compose with
    :class:`~ppo_cbp.plasticity.resets.AdamStateReset` for a new optimizer at a boundary.

    Two schedules (``every``):

    * ``"task_boundary"``: at each task boundary, as Ash and Adams (2020, "On Warm-Starting
      Neural Network Training", NeurIPS) apply it when new data arrive. Default ``alpha = 0.5``:
      Juliani and Ash's boundary condition ``sp-5-5`` (shrink 0.5, perturb 0.5; ``hyperparams.
      yaml`` of github.com/awjuliani/deep-rl-plasticity).
    * ``"step"``: after every optimizer step, the soft variant of Juliani and Ash (2024, "A Study
      of Plasticity Loss in On-Policy Deep Reinforcement Learning", NeurIPS), their best
      intervention. Default ``alpha = 0.999999``: their ``ssp-6`` (shrink 0.999999, perturb 1e-6).

    Ash and Adams weight the shrink and the noise separately (``lambda * theta + sigma *
    theta_fresh``); the interpolation form here ties them (``sigma = 1 - lambda``), as both of
    Juliani and Ash's settings do, so one number sets both and ``alpha = 0`` is a full reset.

    :param net: the network.
    :param shrink: ``alpha`` in [0, 1] (1: no change, 0: a full re-initialisation); None takes the
        source's default for ``every``.
    :param every: ``"task_boundary"`` or ``"step"``.
    """

    name = "shrink_perturb"

    def __init__(
        self,
        net: Network,
        shrink: float | None = None,
        every: Literal["task_boundary", "step"] = "task_boundary",
    ):
        if every not in DEFAULT_SHRINK:
            raise ValueError(f"every must be 'task_boundary' or 'step', got {every!r}")
        shrink = DEFAULT_SHRINK[every] if shrink is None else float(shrink)
        if not 0.0 <= shrink <= 1.0:
            raise ValueError(f"shrink must be in [0, 1], got {shrink}")
        self.net = net
        self.shrink = shrink
        self.every = every
        self.generators = generators_for(net, TAG_SHRINK_PERTURB)
        self._draws: dict[int, Tensor] = {}

    @torch.no_grad()
    def apply(self) -> None:
        """One shrink toward a fresh draw, whatever the schedule."""
        alpha = self.shrink
        if alpha == 1.0:
            return
        for i, layer in enumerate(self.net.layers):
            out = None
            if self.every == "step":  # a buffer per layer, not a fresh tensor every step
                out, w = self._draws.get(i), layer.weight
                if out is None or out.shape != w.shape or out.dtype != w.dtype:
                    out = self._draws[i] = torch.empty(w.shape, dtype=w.dtype, device=w.device)
            fresh = fresh_weight(layer, self.net.seed_dims, self.generators, out=out)
            layer.weight.mul_(alpha).add_(fresh, alpha=1.0 - alpha)
            if layer.bias is not None:
                layer.bias.mul_(alpha)

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        if self.every == "step":
            self.apply()

    def at_task_boundary(self) -> None:
        if self.every == "task_boundary":
            self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_generator_states(self.generators, state["generators"])
