"""The environment side of the experiments: non-stationary MuJoCo and checkpointable vector envs.

Installed as ``ppo_cbp.envs`` (the folder stays at the top of the repository); imports
nothing else from ``ppo_cbp``.
"""

from ppo_cbp.envs.dynamics import DynamicsChange, FixedDynamics, paper_frictions
from ppo_cbp.envs.friction import FrictionChange, sample_frictions
from ppo_cbp.envs.vector import EnvFactory, ParallelEnvs, SingleEnv, make

__all__ = [
    "DynamicsChange",
    "EnvFactory",
    "FixedDynamics",
    "FrictionChange",
    "ParallelEnvs",
    "SingleEnv",
    "make",
    "paper_frictions",
    "sample_frictions",
]
