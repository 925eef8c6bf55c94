"""Running statistics for the PPO trainer's optional observation and reward normalisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["RunningMeanStd"]


class RunningMeanStd:
    """Running mean and (population) variance of samples, in float64 (Chan et al.'s update).

    Starts from mean 0, variance 1 and a pseudo-count ``epsilon``, like gymnasium's.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon

    def update(self, x: np.ndarray) -> None:
        """Add a batch ``[n, *shape]`` of samples."""
        batch_mean, batch_var, n = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = np.asarray(self.mean + delta * n / total)
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = np.asarray(m2 / total)
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "var": torch.from_numpy(self.var.copy()),
            "count": float(self.count),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state["mean"].numpy().astype(np.float64)
        self.var = state["var"].numpy().astype(np.float64)
        self.count = float(state["count"])
