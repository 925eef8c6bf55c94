"""Every seed derivation of the package and one table of the random-stream tags each one takes.

A run has one integer seed; each use of randomness (a network's init, CBP's draws, an example
order, a perturbation) draws from its own stream, derived from that seed and a *tag*. Two uses
that share a derivation must never share a tag, or their draws would be identical and
correlated: :data:`STREAM_TAGS` lists every tag by derivation, and the tests check that no value
repeats within one. A new use of randomness takes a new tag here, never a literal in its module.

The derivations (all from ``numpy.random.SeedSequence``, whose output is stable across NumPy
versions and platforms):

- :func:`derive_seed` ``(seed, tag)``: a 63-bit seed for a ``torch.Generator``; the supervised
  learners, the plasticity operators' per-seed generators and the conv benchmarks' streams.
- :func:`task_rng` ``(seed, task, stream)``: a NumPy ``PCG64`` generator for one task's draws in
  the datasets (Permuted MNIST's pixel permutation and example order, Continual ImageNet's class
  pairs, CIFAR-100's class order).
- :func:`indexed_rng` ``(seed, tag, index)``: a NumPy ``PCG64`` generator for block ``index`` of
  a data stream; Slowly-Changing Regression's target network and bit streams.
- :func:`ppo_seeds` ``(seed)``: the PPO trainer's four stream seeds, by position
  (:data:`PPO_STREAMS`).

Outside this table: environment ``i`` of a PPO run is reset with ``seed + i``, its friction
sequence is ``PCG64(seed)`` (:mod:`ppo_cbp.envs.friction`; the other env changes' streams are
:func:`env_change_seed`'s), and continual backprop draws its
fractional replacement counts from ``default_rng(seed)`` of the seed it is given.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "INCREMENT_INIT_STRIDE",
    "PPO_STREAMS",
    "STREAM_TAGS",
    "derive_seed",
    "env_change_seed",
    "increment_init_tag",
    "indexed_rng",
    "ppo_seeds",
    "task_rng",
]

# ---- derive_seed(seed, tag): torch generators ---------------------------------------------------
TAG_INIT = 0
"""A network's initial weights."""
TAG_CBP = 1
"""Continual backprop's unit choices and new weights in the supervised learners."""
TAG_DROPOUT = 2
"""The fused trainer's dropout masks."""
TAG_NOISE = 3
"""Shrink & Perturb's noise in the supervised learners."""
TAG_REDO = 4
"""ReDo's new weights in the supervised learners."""
TAG_SHUFFLE = 10
"""The conv benchmarks' example order within a task."""
TAG_AUGMENT = 11
"""The conv benchmarks' random crops and flips."""
TAG_HEAD = 12
"""The conv benchmarks' head re-initialisations."""
TAG_METRIC_EXAMPLES = 13
"""Class-incremental CIFAR-100's choice of the examples its dead-unit and rank metrics read."""
TAG_SHRINK_PERTURB = 20
"""Shrink & Perturb toward a fresh initialisation (:class:`~ppo_cbp.plasticity.shrink_perturb.ShrinkPerturb`)."""
TAG_LAYER_RESET = 21
"""Layer and head resets (:class:`~ppo_cbp.plasticity.resets.LayerReset`)."""
TAG_UPGD = 30
"""UPGD's perturbations (:class:`~ppo_cbp.plasticity.upgd.UPGD`)."""
TAG_KRON = 31
"""PSGD Kron's draws: its balancing trigger and preconditioner-update probes
(:class:`~ppo_cbp.plasticity.kron.Kron`)."""
INJECTION_TAGS = range(50, 60)
"""Plasticity injection's new branches, one tag per network that shares an optimizer."""
TAG_INJECTION = INJECTION_TAGS.start
"""The first of :data:`INJECTION_TAGS`, the default."""
TAG_CHURN_REFERENCE = 60
"""C-CHAIN's reference batches (:class:`~ppo_cbp.plasticity.c_chain.ChurnReduction`)."""
TAG_GRAVITY = 70
"""The PPO trainer's gravity multipliers (:class:`~ppo_cbp.envs.dynamics.DynamicsChange`, through
:func:`env_change_seed`; friction keeps ``PCG64(seed)``, and each quantity has its own stream so
that adding one leaves the others' sequences as they were)."""
TAG_MASS = 71
"""The PPO trainer's body-mass multipliers."""
TAG_DAMPING = 72
"""The PPO trainer's joint-damping multipliers."""
TAG_GEAR = 73
"""The PPO trainer's actuator-gear multipliers."""
TAG_OBS_PERMUTE = 74
"""The PPO trainer's per-segment observation permutations."""
TAG_OBS_OFFSET = 75
"""The PPO trainer's per-segment observation offsets."""
TAG_EVAL = 76
"""The PPO trainer's evaluation episodes: their env's first reset seed
(:mod:`ppo_cbp.ppo.evaluation`)."""
INCREMENT_INIT_STRIDE = 1000
"""Class-incremental CIFAR-100's network of increment ``k`` (retrained from scratch) is initialised
from tag ``TAG_INIT + 1000 * k`` (:func:`increment_init_tag`): increment 0 is the run's own
initial network, and the multiples of 1000 are kept free of every other tag."""

# ---- task_rng(seed, task, stream): NumPy generators of the datasets -----------------------------
STREAM_PIXELS = 0
"""Permuted MNIST: task ``k``'s pixel permutation."""
STREAM_EXAMPLES = 1
"""Permuted MNIST: task ``k``'s example order."""
STREAM_CLASS_PAIRS = 7
"""Continual ImageNet: the class pair of task ``k``."""
STREAM_CLASS_ORDER = 8
"""Class-incremental CIFAR-100: the order of the classes (task 0)."""

# ---- indexed_rng(seed, tag, index): Slowly-Changing Regression's streams ------------------------
SCR_TARGET = 0
"""The target network's weights and thresholds."""
SCR_INITIAL_BITS = 1
"""The slow bits' first values."""
SCR_SLOW = 2
"""The slow bits redrawn at each change (``--no-flip-one``)."""
SCR_FLIP = 3
"""The slow bit flipped at each change."""
SCR_RANDOM = 4
"""The fast random bits of the inputs."""

# ---- ppo_seeds(seed): the PPO trainer's streams, by position ------------------------------------
PPO_STREAMS = {"main": 0, "perturb": 1, "policy": 2, "value": 3}
"""Position in :func:`ppo_seeds` of each stream of the PPO trainer: ``main`` (action noise and
minibatch order), ``perturb`` (Shrink & Perturb's noise, and UPGD's and Kron's draws through
:func:`derive_seed`), ``policy`` and ``value`` (each network's CBP, ReDo and per-network methods;
C-CHAIN's reference batches through :func:`derive_seed` of the policy's)."""

STREAM_TAGS: dict[str, dict[str, int | range]] = {
    "derive_seed": {
        "TAG_INIT": TAG_INIT,
        "TAG_CBP": TAG_CBP,
        "TAG_DROPOUT": TAG_DROPOUT,
        "TAG_NOISE": TAG_NOISE,
        "TAG_REDO": TAG_REDO,
        "TAG_SHUFFLE": TAG_SHUFFLE,
        "TAG_AUGMENT": TAG_AUGMENT,
        "TAG_HEAD": TAG_HEAD,
        "TAG_METRIC_EXAMPLES": TAG_METRIC_EXAMPLES,
        "TAG_SHRINK_PERTURB": TAG_SHRINK_PERTURB,
        "TAG_LAYER_RESET": TAG_LAYER_RESET,
        "TAG_UPGD": TAG_UPGD,
        "TAG_KRON": TAG_KRON,
        "INJECTION_TAGS": INJECTION_TAGS,
        "TAG_CHURN_REFERENCE": TAG_CHURN_REFERENCE,
        "TAG_GRAVITY": TAG_GRAVITY,
        "TAG_MASS": TAG_MASS,
        "TAG_DAMPING": TAG_DAMPING,
        "TAG_GEAR": TAG_GEAR,
        "TAG_OBS_PERMUTE": TAG_OBS_PERMUTE,
        "TAG_OBS_OFFSET": TAG_OBS_OFFSET,
        "TAG_EVAL": TAG_EVAL,
    },
    "task_rng": {
        "STREAM_PIXELS": STREAM_PIXELS,
        "STREAM_EXAMPLES": STREAM_EXAMPLES,
        "STREAM_CLASS_PAIRS": STREAM_CLASS_PAIRS,
        "STREAM_CLASS_ORDER": STREAM_CLASS_ORDER,
    },
    "indexed_rng": {
        "SCR_TARGET": SCR_TARGET,
        "SCR_INITIAL_BITS": SCR_INITIAL_BITS,
        "SCR_SLOW": SCR_SLOW,
        "SCR_FLIP": SCR_FLIP,
        "SCR_RANDOM": SCR_RANDOM,
    },
    "ppo_seeds": dict(PPO_STREAMS),
}
"""Every tag, by the derivation it feeds (:data:`INCREMENT_INIT_STRIDE`'s family aside: the
tests check that no other ``derive_seed`` tag is a positive multiple of it)."""


def derive_seed(seed: int, tag: int) -> int:
    """A 63-bit ``torch.Generator`` seed for stream ``tag`` of run ``seed``.

    :param seed: the run's seed.
    :param tag: the stream, one of :data:`STREAM_TAGS` ``["derive_seed"]``.
    :return: the first 64-bit word of ``SeedSequence([seed, tag])``, shifted right by one bit.
    """
    return int(np.random.SeedSequence([int(seed), int(tag)]).generate_state(1, np.uint64)[0] >> 1)


def env_change_seed(seed: int, stream: str) -> int:
    """The seed of env-change stream ``stream`` (``gravity``, ``mass``, ``damping``, ``gear``,
    ``permute``, ``offset``) of run ``seed``: :func:`derive_seed` with its ``TAG_*``."""
    tags = {
        "gravity": TAG_GRAVITY,
        "mass": TAG_MASS,
        "damping": TAG_DAMPING,
        "gear": TAG_GEAR,
        "permute": TAG_OBS_PERMUTE,
        "offset": TAG_OBS_OFFSET,
    }
    return derive_seed(seed, tags[stream])


def increment_init_tag(increment: int) -> int:
    """The :func:`derive_seed` tag of class-incremental CIFAR-100's network of ``increment``
    (see :data:`INCREMENT_INIT_STRIDE`)."""
    return TAG_INIT + INCREMENT_INIT_STRIDE * increment


def _check_index(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def task_rng(seed: int, task: int, stream: int) -> np.random.Generator:
    """PCG64 generator of ``SeedSequence([seed, task, stream])``.

    A pure function of its arguments: task ``k`` is the same however many tasks were drawn before
    (checkpoint/resume).

    :param seed: the run's seed, non-negative.
    :param task: the task's index, non-negative.
    :param stream: which draw of the task, one of :data:`STREAM_TAGS` ``["task_rng"]``.
    """
    _check_index("seed", seed)
    _check_index("task", task)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, task, stream])))


def indexed_rng(seed: int, tag: int, index: int) -> np.random.Generator:
    """PCG64 generator of ``SeedSequence([seed, tag, index])``: block ``index`` of stream ``tag``.

    :param seed: the run's seed.
    :param tag: the stream, one of :data:`STREAM_TAGS` ``["indexed_rng"]``.
    :param index: the block of the stream (a change, a chunk of examples).
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tag, index])))


def ppo_seeds(seed: int) -> list[int]:
    """The PPO trainer's four stream seeds, 63-bit, in the order of :data:`PPO_STREAMS`: the first
    four 64-bit words of ``SeedSequence(seed)``, each modulo ``2**63``."""
    words = np.random.SeedSequence(seed).generate_state(len(PPO_STREAMS), dtype=np.uint64)
    return [s % 2**63 for s in words.tolist()]
