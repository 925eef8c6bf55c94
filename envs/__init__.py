"""The environment side of the experiments: non-stationary MuJoCo and checkpointable vector envs.

Imports nothing from ``ppo_cbp``.
"""

from envs.friction import FrictionChange, sample_frictions
from envs.vector import EnvFactory, ParallelEnvs, SingleEnv, make

__all__ = ["EnvFactory", "FrictionChange", "ParallelEnvs", "SingleEnv", "make", "sample_frictions"]
