"""Supervised continual-learning benchmarks of Dohare et al. (2024), many seeds per process."""

from ppo_cbp.benchmarks.common import METHODS, MethodConfig
from ppo_cbp.benchmarks.permuted_mnist import PermutedMNISTConfig, run_permuted_mnist
from ppo_cbp.benchmarks.scr import SCRConfig, run_scr

__all__ = [
    "METHODS",
    "MethodConfig",
    "PermutedMNISTConfig",
    "SCRConfig",
    "run_permuted_mnist",
    "run_scr",
]
