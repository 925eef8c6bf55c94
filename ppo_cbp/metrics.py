"""Plasticity metrics: dead and dormant units, weight magnitude, feature ranks, weight change,
feature and gradient norms, policy churn.

These are the correlates of loss of plasticity measured by Dohare et al., "Loss of plasticity in
deep continual learning" (Nature, 2024), plus the tau-dormant score of ReDo (Sokar et al., "The
dormant neuron phenomenon in deep reinforcement learning", ICML 2023), the feature and gradient
norms of Lyle et al. (2023, 2024) and the policy churn of C-CHAIN (Tang et al., ICML 2025).

Conventions shared by every function:

- Activations are ``[..., N, units]``: N samples (dimension -2) of a layer with ``units`` hidden
  units (dimension -1). Leading dimensions are batch dimensions, e.g. ``[S, N, units]`` for S
  seeds trained side by side, and every result keeps them (a ``[S]`` or ``[S, units]`` tensor).
- On a CReLU network (:class:`~ppo_cbp.nets.crelu.CReLU`) a hidden layer of ``n`` units hands
  the next layer ``2n`` features ``relu(z_i), relu(-z_i)``. The feature metrics (feature norm,
  every rank) take those ``[..., N, 2n]`` features, what the next layer reads; the unit metrics
  (dead and dormant units) take each unit's activation, the mean of its two outputs
  ``|z_i| / 2`` (:func:`unit_activations`), as continual backprop and ReDo see the unit. A DFF
  network (:class:`~ppo_cbp.nets.dff.DFF`) likewise hands ``sin(z_i), cos(z_i)``, and a unit's
  activation is the mean magnitude of its two outputs, ``(|sin z_i| + |cos z_i|) / 2``.
- Convolutional feature maps ``[N, C, H, W]`` are first turned into ``[N * H * W, C]`` with
  :func:`conv_activations_as_samples`: a (sample, spatial position) pair counts as one sample and a
  channel counts as one unit, as in the paper's CIFAR-100 analysis and in official ReDo.
- Results are tensors on the input's device. Nothing calls ``.item()`` or copies to the host, so
  the metrics can be computed inside a training loop and the caller decides when to synchronise.
  Only :func:`max_over_windows`, which post-processes logged values, works on the host.
- Real-valued results (fractions, magnitudes, effective rank, weight change) are float64; counts
  (stable and approximate rank) are int64. Singular values are computed in float64.
- Metrics never build autograd graphs (they run under ``torch.no_grad()``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ppo_cbp.nets.units import hidden_features

__all__ = [
    "DORMANT_SCORE_EPS",
    "WeightChangeTracker",
    "approximate_rank",
    "average_weight_magnitude",
    "conv_activations_as_samples",
    "dead_unit_fraction",
    "dead_unit_mask",
    "dormant_ratio",
    "dormant_scores",
    "effective_rank",
    "feature_norm",
    "feature_rank_metrics",
    "gradient_norm",
    "layer_weights",
    "max_over_windows",
    "plasticity_metrics",
    "policy_churn",
    "policy_kl",
    "stable_rank",
    "unit_activations",
    "unit_activity",
    "weight_magnitudes",
]

DORMANT_SCORE_EPS = 1e-9
"""Added to the layer's mean activation magnitude in :func:`dormant_scores`, as official ReDo does
(``score / (mean(score) + 1e-9)``), so that a layer whose activations are all zero gives scores of
0 (every unit dormant) instead of NaN."""


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _check_activations(activations: Tensor) -> None:
    if not isinstance(activations, Tensor):
        raise TypeError(
            f"activations must be a torch.Tensor of shape [..., N, units], got {type(activations)}"
        )
    if activations.ndim < 2:
        raise ValueError(
            "activations must have shape [..., N, units] (samples on dim -2, units on dim -1), "
            f"got shape {tuple(activations.shape)}"
        )
    if activations.shape[-2] == 0 or activations.shape[-1] == 0:
        raise ValueError(
            f"activations need at least one sample and one unit, got shape {tuple(activations.shape)}"
        )
    if activations.is_complex():
        raise ValueError(f"activations must be real, got dtype {activations.dtype}")


def _check_matrix(matrix: Tensor) -> None:
    if not isinstance(matrix, Tensor):
        raise TypeError(f"matrix must be a torch.Tensor of shape [..., n, m], got {type(matrix)}")
    if matrix.ndim < 2:
        raise ValueError(f"matrix must have shape [..., n, m], got shape {tuple(matrix.shape)}")
    if matrix.shape[-2] == 0 or matrix.shape[-1] == 0:
        raise ValueError(f"matrix must not be empty, got shape {tuple(matrix.shape)}")
    if matrix.is_complex():
        raise ValueError(f"matrix must be real, got dtype {matrix.dtype}")


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _check_seed_dims(seed_dims: int) -> None:
    if isinstance(seed_dims, bool) or not isinstance(seed_dims, int) or seed_dims < 0:
        raise ValueError(f"seed_dims must be a non-negative int, got {seed_dims!r}")


# --------------------------------------------------------------------------------------------------
# Convolutional layers
# --------------------------------------------------------------------------------------------------


def conv_activations_as_samples(x: Tensor) -> Tensor:
    """Reshape convolutional activations ``[..., N, C, H, W]`` into ``[..., N * H * W, C]``.

    Each (sample, spatial position) pair becomes one row and each channel one unit, so that the
    unit metrics of this module apply to conv layers. For dead units this gives the paper's CIFAR
    definition (the fraction of (sample, position) entries at which a channel is non-zero); for
    :func:`dormant_scores` it gives official ReDo's reduction over the batch and spatial axes.

    :param x: activations of a conv layer, ``[..., N, C, H, W]``.
    :return: a new tensor ``[..., N * H * W, C]`` on the same device.
    """
    if not isinstance(x, Tensor) or x.ndim < 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x)
        raise ValueError(f"conv activations must have shape [..., N, C, H, W], got {shape}")
    return x.movedim(-3, -1).flatten(-4, -2)


# --------------------------------------------------------------------------------------------------
# Dead and dormant units
# --------------------------------------------------------------------------------------------------


def unit_activations(features: Tensor, outputs_per_unit: int = 1) -> Tensor:
    """Each unit's activation from a layer's features: the mean magnitude of the unit's outputs.

    ``features`` is ``[..., N, units * outputs_per_unit]`` with unit ``i``'s outputs at columns
    ``i * g, ..., i * g + g - 1`` (``g = outputs_per_unit``), the layout of
    :class:`~ppo_cbp.nets.crelu.CReLU` (``g = 2``: ``relu(z_i), relu(-z_i)``, non-negative, whose
    mean is ``|z_i| / 2``, :meth:`CReLU.unit_activation`) and of :class:`~ppo_cbp.nets.dff.DFF`
    (``g = 2``: ``sin(z_i), cos(z_i)``, giving ``(|sin z_i| + |cos z_i|) / 2``,
    :meth:`DFF.unit_activation`; the magnitudes, because a signed mean ``sin(z + pi/4) / sqrt(2)``
    would vanish at an arbitrary phase). With ``g = 1`` (every other activation) the features
    are the units' activations and are returned as they are.

    :param features: ``[..., N, units * outputs_per_unit]``.
    :param outputs_per_unit: features per unit, >= 1.
    :return: ``[..., N, units]`` (the input itself for ``outputs_per_unit = 1``).
    """
    if isinstance(outputs_per_unit, bool) or not isinstance(outputs_per_unit, int):
        raise ValueError(f"outputs_per_unit must be a positive int, got {outputs_per_unit!r}")
    if outputs_per_unit < 1 or features.shape[-1] % outputs_per_unit:
        raise ValueError(
            f"{features.shape[-1]} features are not {outputs_per_unit} outputs per unit"
        )
    if outputs_per_unit == 1:
        return features
    return features.unflatten(-1, (-1, outputs_per_unit)).abs().mean(dim=-1)


@torch.no_grad()
def unit_activity(activations: Tensor) -> Tensor:
    """Fraction of samples on which each unit is active, i.e. its activation is non-zero.

    ``activity_i = (1/N) * #{n : h[n, i] != 0}``. For ReLU units "non-zero" and "> 0" coincide;
    this is the per-unit activity the paper's RL code logs (fraction of acting steps with ReLU
    output > 0).

    :param activations: ``[..., N, units]``.
    :return: float64 tensor ``[..., units]`` with values in [0, 1].
    """
    _check_activations(activations)
    n_samples = activations.shape[-2]
    return (activations != 0).sum(dim=-2, dtype=torch.float64) / n_samples


@torch.no_grad()
def dead_unit_mask(activations: Tensor, max_active_fraction: float = 0.0) -> Tensor:
    """Boolean mask of dead units: units active (non-zero) on at most ``max_active_fraction`` of the N samples.

    A unit is dead if ``unit_activity(activations)_i <= max_active_fraction`` (see
    :func:`unit_activity`; the fraction is computed in float64, so e.g. 1 active sample out of 100
    is exactly at the threshold 0.01 and counts as dead).

    - ``max_active_fraction = 0`` (default): the unit is zero on every sample. This is the paper's
      supervised definition (Permuted MNIST: zero on all of the first 2,000 examples of a new task).
    - ``max_active_fraction = 0.01``: the paper's RL definition (active on at most 1% of the last
      1,000 acting steps).

    On a CReLU network pass the units' activations, not the ``2n`` features
    (``unit_activations(features, 2)``, ``|z_i| / 2``): a CReLU unit is active on a sample where
    either of its outputs ``relu(z_i), relu(-z_i)`` is non-zero, i.e. where ``z_i != 0``, and dead
    only when ``z_i = 0`` on (nearly) every sample, the only way it stops passing both signal and
    gradient. A unit whose ``z_i`` keeps one sign has one output that is zero throughout, but
    the other carries its signal and gradient, so it is not dead; the denominator of a dead
    fraction is the number of units, as for ReLU networks, not of features.

    Per-layer dead counts, for logging, are ``dead_unit_mask(h).sum(-1)``.

    :param activations: ``[..., N, units]``; conv layers via :func:`conv_activations_as_samples`.
    :param max_active_fraction: in [0, 1).
    :return: bool tensor ``[..., units]``.
    """
    if not 0.0 <= max_active_fraction < 1.0:
        raise ValueError(f"max_active_fraction must be in [0, 1), got {max_active_fraction}")
    return unit_activity(activations) <= max_active_fraction


@torch.no_grad()
def dead_unit_fraction(activations: Tensor, max_active_fraction: float = 0.0) -> Tensor:
    """Fraction of a layer's units that are dead, as defined in :func:`dead_unit_mask`.

    For the fraction over a whole network of layers with different widths, sum the per-layer
    counts ``dead_unit_mask(h).sum(-1)`` and divide by the total width (not the mean of fractions).

    :param activations: ``[..., N, units]``.
    :param max_active_fraction: in [0, 1); 0 means "zero on every sample".
    :return: float64 tensor ``[...]``.
    """
    mask = dead_unit_mask(activations, max_active_fraction)
    return mask.sum(dim=-1, dtype=torch.float64) / mask.shape[-1]


@torch.no_grad()
def dormant_scores(activations: Tensor) -> Tensor:
    """ReDo's tau-dormant score of each unit (Sokar et al., 2023, Definition 3.1).

    ``s_i = E|h_i| / ((1/H) * sum_j E|h_j| + 1e-9)``, where ``E`` is the mean over the N samples and
    H is the number of units. The ``+ 1e-9`` (:data:`DORMANT_SCORE_EPS`) is official ReDo's: when
    every activation of the layer is zero all scores are 0 (all units dormant) rather than NaN. It
    only matters when the layer's mean magnitude is itself near 1e-9.

    :param activations: ``[..., N, units]``; conv layers via :func:`conv_activations_as_samples`.
    :return: tensor ``[..., units]`` in the activations' dtype (at least float32).
    """
    _check_activations(activations)
    dtype = torch.promote_types(activations.dtype, torch.float32)
    mean_abs = activations.abs().mean(dim=-2, dtype=dtype)
    return mean_abs / (mean_abs.mean(dim=-1, keepdim=True) + DORMANT_SCORE_EPS)


@torch.no_grad()
def dormant_ratio(activations: Tensor, tau: float = 0.1) -> Tensor:
    """Fraction of tau-dormant units: units whose :func:`dormant_scores` ``s_i <= tau``.

    The comparison includes equality, as official ReDo does, so ``tau = 0`` counts exactly the units
    that are zero on every sample. The paper's PPO+ReDo and official ReDo use tau = 0.1.

    :param activations: ``[..., N, units]``.
    :param tau: dormancy threshold, >= 0.
    :return: float64 tensor ``[...]``.
    """
    if not tau >= 0.0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    dormant = dormant_scores(activations) <= tau
    return dormant.sum(dim=-1, dtype=torch.float64) / dormant.shape[-1]


# --------------------------------------------------------------------------------------------------
# Weight magnitude
# --------------------------------------------------------------------------------------------------


def layer_weights(module: nn.Module, seed_dims: int = 0) -> list[tuple[str, Tensor]]:
    """The layer weight matrices of ``module``, as ``(parameter name, parameter)`` pairs.

    A parameter is a layer weight if its name is ``weight`` (e.g. ``"0.weight"``) and it has at
    least ``2 + seed_dims`` dimensions: the weights of Linear and Conv layers, and their
    seed-batched versions ``[S, out, in]`` with ``seed_dims=1``. Biases and the (vector) scales of
    normalisation layers are excluded, as in the paper's "Σ|w| over the network's weights".

    :param module: the network.
    :param seed_dims: number of leading seed dimensions of each weight.
    """
    _check_seed_dims(seed_dims)
    return [
        (name, param)
        for name, param in module.named_parameters()
        if name.rsplit(".", 1)[-1] == "weight" and param.ndim >= 2 + seed_dims
    ]


def _check_weight_tensors(weights: Sequence[Tensor], seed_dims: int) -> None:
    if len(weights) == 0:
        raise ValueError("no weight tensors given")
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w)}")
        if w.ndim <= seed_dims:
            raise ValueError(
                f"weights[{i}] has shape {tuple(w.shape)}: need more than seed_dims={seed_dims} dims"
            )
        if w.shape[:seed_dims] != weights[0].shape[:seed_dims]:
            raise ValueError(
                f"weights[{i}] has leading seed shape {tuple(w.shape[:seed_dims])}, "
                f"expected {tuple(weights[0].shape[:seed_dims])} like weights[0]"
            )


def _abs_sums_and_counts(
    weights: Sequence[Tensor], seed_dims: int
) -> tuple[list[Tensor], list[int]]:
    _check_weight_tensors(weights, seed_dims)
    sums, counts = [], []
    for w in weights:
        dims = tuple(range(seed_dims, w.ndim))
        # float64 accumulation: the paper's network has ~10M weights.
        sums.append(w.detach().abs().sum(dim=dims, dtype=torch.float64))
        counts.append(w.shape[seed_dims:].numel())
    return sums, counts


@torch.no_grad()
def average_weight_magnitude(weights: Tensor | Iterable[Tensor], seed_dims: int = 0) -> Tensor:
    """Average weight magnitude: ``sum |w| / (number of weights)`` over all given weight tensors.

    This is the paper's measure ("adding up their absolute values and dividing by the total number
    of weights in the network"). Pass only weight matrices (see :func:`layer_weights`); biases are
    excluded by the caller. Each entry counts once, so large layers weigh more than small ones.

    :param weights: one tensor or an iterable of tensors.
    :param seed_dims: number of leading seed dimensions shared by all tensors; e.g. ``seed_dims=1``
        for weights ``[S, out, in]`` gives one value per seed, shape ``[S]``.
    :return: float64 tensor of shape ``weights[0].shape[:seed_dims]``.
    """
    _check_seed_dims(seed_dims)
    tensors = [weights] if isinstance(weights, Tensor) else list(weights)
    sums, counts = _abs_sums_and_counts(tensors, seed_dims)
    return torch.stack(sums).sum(dim=0) / sum(counts)


@torch.no_grad()
def weight_magnitudes(module: nn.Module, seed_dims: int = 0) -> dict[str, Tensor]:
    """Per-layer and overall average weight magnitude of a network.

    For each layer weight ``W`` from :func:`layer_weights` the entry ``name -> mean |W|`` (keyed by
    the parameter name, e.g. ``"0.weight"``), and ``"overall" -> sum over all layers of sum |W|,
    divided by the total number of weights`` (the paper's network-wide measure). ``overall`` is
    therefore the mean of per-layer means weighted by layer size, not their plain mean.

    :param module: the network.
    :param seed_dims: number of leading seed dimensions of the weights (values then have that shape).
    :return: dict of float64 tensors; ``"overall"`` comes last.
    """
    named = layer_weights(module, seed_dims)
    if not named:
        raise ValueError(
            f"{type(module).__name__} has no layer weights (parameters named 'weight' with at least "
            f"{2 + seed_dims} dims)"
        )
    sums, counts = _abs_sums_and_counts([w for _, w in named], seed_dims)
    result = {name: s / c for (name, _), s, c in zip(named, sums, counts, strict=True)}
    result["overall"] = torch.stack(sums).sum(dim=0) / sum(counts)
    return result


# --------------------------------------------------------------------------------------------------
# Ranks of a representation
# --------------------------------------------------------------------------------------------------


def _singular_values(matrix: Tensor) -> Tensor:
    """Singular values ``[..., min(n, m)]`` in descending order, computed in float64; all NaN for
    a matrix with a non-finite entry (a diverged network's features), without failing."""
    _check_matrix(matrix)
    matrix = matrix.detach()
    if matrix.dtype != torch.float64:
        matrix = matrix.to(torch.float64)
    finite = torch.isfinite(matrix).flatten(-2).all(-1)
    matrix = torch.where(finite[..., None, None], matrix, torch.zeros_like(matrix))
    return torch.linalg.svdvals(matrix).masked_fill(~finite[..., None], float("nan"))


def _effective_rank_from_singular_values(sv: Tensor) -> Tensor:
    total = sv.sum(dim=-1, keepdim=True)
    nonzero = total > 0
    p = sv / torch.where(nonzero, total, torch.ones_like(total))
    # xlogy(0, 0) = 0 implements the sum over p_k > 0 only.
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    zero_or_nan = total.squeeze(-1) * 0.0  # NaN for a non-finite matrix
    return torch.where(nonzero.squeeze(-1), torch.exp(entropy), zero_or_nan)


def _cumulative_share_rank(values: Tensor, threshold: float) -> Tensor:
    """Smallest k with ``sum_{i<=k} v_i / sum_j v_j >= threshold`` for v sorted descending; 0 if
    all v are 0, -1 if they are NaN (a non-finite matrix)."""
    total = values.sum(dim=-1, keepdim=True)
    nonzero = total > 0
    share = values.cumsum(dim=-1) / torch.where(nonzero, total, torch.ones_like(total))
    # The official code's "sum(cumsum / total < threshold) + 1". The clamp only guards against the
    # last cumulative share rounding to just below a threshold of 1.
    k = ((share < threshold).sum(dim=-1) + 1).clamp(max=values.shape[-1])
    k = torch.where(nonzero.squeeze(-1), k, torch.zeros_like(k))
    return k.masked_fill(total.squeeze(-1).isnan(), -1)


@torch.no_grad()
def effective_rank(matrix: Tensor) -> Tensor:
    """Effective rank (Roy & Vetterli, 2007), equation (2) of Dohare et al. (2024).

    With the singular values ``sigma_k`` of ``matrix`` and ``p_k = sigma_k / ||sigma||_1``:
    ``erank = exp(-sum_{k: p_k > 0} p_k log p_k)``. It lies between 1 and the rank of the matrix.
    Zero singular values contribute nothing, so using ``min(n, m)`` singular values (rather than
    the paper's ``max(n, m)`` with zeros appended) gives the same value.

    The zero matrix, for which ``p`` is 0/0, is defined to have effective rank **0**, its rank (a
    layer whose units are all dead carries no information). The official code returns 1 there.

    The paper computes it on the representation (activations) of a layer for 2,000 samples, not
    centred: pass ``[..., N, units]`` activations, the features the next layer reads (on a CReLU
    network its ``[..., N, 2 * units]`` outputs ``[relu(z), relu(-z)]``).

    :param matrix: ``[..., n, m]``; singular values are computed in float64.
    :return: float64 tensor ``[...]``.
    """
    return _effective_rank_from_singular_values(_singular_values(matrix))


@torch.no_grad()
def stable_rank(matrix: Tensor, threshold: float = 0.99) -> Tensor:
    """The paper's "stable rank": the number of singular values holding 99% of their sum.

    With singular values sorted in descending order, ``min {k : sum_{i<=k} sigma_i / sum_j sigma_j
    >= threshold}``, computed as ``sum(cumsum(sigma) / sum(sigma) < threshold) + 1`` like the
    official code (its "abs approximate rank"). The paper's text writes ``> 0.99``; the two differ
    only when a cumulative share equals the threshold exactly, which has probability zero for real
    data, and then this function returns the smaller k (the official code's answer).

    This is not the ``||A||_F^2 / ||A||_2^2`` stable rank of numerical linear algebra. The zero
    matrix gives 0 (the official code returns 1).

    :param matrix: ``[..., n, m]``, e.g. a layer's ``[N, units]`` activations.
    :param threshold: share of the singular-value sum, in (0, 1].
    :return: int64 tensor ``[...]`` with values in ``[1, min(n, m)]`` (0 for a zero matrix).
    """
    _check_threshold(threshold)
    return _cumulative_share_rank(_singular_values(matrix), threshold)


@torch.no_grad()
def approximate_rank(matrix: Tensor, threshold: float = 0.99) -> Tensor:
    """Approximate rank (Yang et al., 2019): the number of singular values holding 99% of the variance.

    ``min {k : sum_{i<=k} sigma_i^2 / sum_j sigma_j^2 >= threshold}`` with ``sigma`` sorted in
    descending order: :func:`stable_rank` on squared singular values, so it is never larger than
    the stable rank. The zero matrix gives 0.

    :param matrix: ``[..., n, m]``.
    :param threshold: share of the sum of squared singular values, in (0, 1].
    :return: int64 tensor ``[...]``.
    """
    _check_threshold(threshold)
    return _cumulative_share_rank(_singular_values(matrix).square(), threshold)


@torch.no_grad()
def feature_rank_metrics(matrix: Tensor, threshold: float = 0.99) -> dict[str, Tensor]:
    """:func:`effective_rank`, :func:`stable_rank` and :func:`approximate_rank` from one SVD.

    :param matrix: ``[..., n, m]``, e.g. a layer's ``[N, units]`` activations: the features the
        next layer reads, ``[N, 2 * units]`` ``[relu(z), relu(-z)]`` on a CReLU network.
    :param threshold: threshold of the stable and approximate ranks, in (0, 1].
    :return: ``{"effective_rank": float64 [...], "stable_rank": int64 [...],
        "approximate_rank": int64 [...]}``.
    """
    _check_threshold(threshold)
    sv = _singular_values(matrix)
    return {
        "effective_rank": _effective_rank_from_singular_values(sv),
        "stable_rank": _cumulative_share_rank(sv, threshold),
        "approximate_rank": _cumulative_share_rank(sv.square(), threshold),
    }


# --------------------------------------------------------------------------------------------------
# Weight change per update
# --------------------------------------------------------------------------------------------------


class WeightChangeTracker:
    """L1 change of a set of weight tensors across one update (Extended Data Fig. 5c).

    Usage, once per PPO update (all epochs and minibatches of one rollout)::

        tracker = WeightChangeTracker(policy_mean_net)  # its Linear weights, biases excluded
        tracker.snapshot()
        ...  # the update
        change = tracker.change()  # sum over tracked tensors of sum |W_after - W_before|

    The snapshot is copied into buffers allocated once at construction, so ``snapshot()`` does no
    allocation. Tensors are tracked by reference: the update must modify them in place (as torch
    optimisers and in-place re-initialisations do), not replace the parameter objects.

    :param weights: a module, whose :func:`layer_weights` are tracked, or an iterable of tensors.
    :param seed_dims: number of leading seed dimensions shared by the tensors; ``change()`` then
        has that shape (one value per seed).
    """

    def __init__(self, weights: nn.Module | Iterable[Tensor], seed_dims: int = 0) -> None:
        _check_seed_dims(seed_dims)
        if isinstance(weights, nn.Module):
            tensors = [w for _, w in layer_weights(weights, seed_dims)]
            if not tensors:
                raise ValueError(f"{type(weights).__name__} has no layer weights to track")
        else:
            tensors = list(weights)
        _check_weight_tensors(tensors, seed_dims)
        self.seed_dims = seed_dims
        self._weights = tensors
        self._buffers = [torch.empty_like(w, requires_grad=False) for w in tensors]
        self._has_snapshot = False

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the current weights into the snapshot buffers (call before the update)."""
        for buffer, w in zip(self._buffers, self._weights, strict=True):
            buffer.copy_(w)
        self._has_snapshot = True

    @torch.no_grad()
    def change(self) -> Tensor:
        """``sum_W sum |W_now - W_snapshot|`` over all tracked tensors, as a float64 tensor.

        Can be called several times after one ``snapshot()``.
        """
        if not self._has_snapshot:
            raise RuntimeError("WeightChangeTracker.change() called before snapshot()")
        total = None
        for buffer, w in zip(self._buffers, self._weights, strict=True):
            dims = tuple(range(self.seed_dims, w.ndim))
            l1 = torch.sub(w, buffer).abs_().sum(dim=dims, dtype=torch.float64)
            total = l1 if total is None else total + l1
        return total


# --------------------------------------------------------------------------------------------------
# Feature and gradient norms
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def feature_norm(activations: Tensor) -> Tensor:
    """Mean over samples of the L2 norm of a layer's feature vector: ``(1/N) sum_n ||h[n, :]||_2``.

    The feature norm of Lyle et al. ("Disentangling the causes of plasticity loss in neural
    networks", 2024) as plasticity studies log it (e.g. Plasticine's ``compute_feature_norm``):
    on the penultimate layer, i.e. the last hidden layer's activations, the features the output
    layer reads (``hidden_features(net, states)[-1][0]``). On a CReLU network these are the
    ``2n`` outputs ``[relu(z), relu(-z)]`` (so ``||h[n, :]||_2 = ||z[n, :]||_2``), not the units'
    activations ``|z| / 2``, whose norm is half of it. For a conv layer pass each sample's whole
    feature map as one vector (``h.flatten(-3)``), not :func:`conv_activations_as_samples`.

    :param activations: ``[..., N, units]``.
    :return: float64 tensor ``[...]``.
    """
    _check_activations(activations)
    return torch.linalg.vector_norm(activations, dim=-1, dtype=torch.float64).mean(dim=-1)


@torch.no_grad()
def gradient_norm(parameters: Tensor | Iterable[Tensor], seed_dims: int = 0) -> Tensor:
    """Global L2 norm of the gradients: ``sqrt(sum over parameters p of sum_i p.grad_i^2)``.

    The quantity ``torch.nn.utils.clip_grad_norm_`` compares with its threshold, and the
    gradient norm plasticity studies report (Lyle et al., 2023; Juliani and Ash, 2024): read it
    after ``backward`` and before any clipping. Parameters without a gradient (``.grad`` None)
    count as zero gradients; accumulated in float64.

    :param parameters: one tensor or an iterable of tensors (e.g. ``net.parameters()``).
    :param seed_dims: number of leading seed dimensions shared by all gradients; e.g. 1 for
        ``[S, ...]`` gradients of S stacked networks gives one norm per seed, shape ``[S]``.
    :return: float64 tensor of shape ``grads[0].shape[:seed_dims]`` (0-dim for ``seed_dims=0``).
    """
    _check_seed_dims(seed_dims)
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    if not params:
        raise ValueError("no parameters given")
    lead = params[0].shape[:seed_dims]
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}] must be a torch.Tensor, got {type(p)}")
        if p.ndim < seed_dims or p.shape[:seed_dims] != lead:
            raise ValueError(
                f"parameters[{i}] has shape {tuple(p.shape)}: expected the leading seed shape "
                f"{tuple(lead)} of parameters[0] (seed_dims={seed_dims})"
            )
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros(lead, dtype=torch.float64, device=params[0].device)
    for g in grads:
        g = g.to(torch.float64)
        # a parameter of one entry per seed has no dims left to reduce (and dim=() reduces all)
        total += (
            g.square() if g.ndim == seed_dims else g.square().sum(tuple(range(seed_dims, g.ndim)))
        )
    return total.sqrt_()


# --------------------------------------------------------------------------------------------------
# Policy churn
# --------------------------------------------------------------------------------------------------


def _check_policy_means(mean_before: Tensor, mean_after: Tensor) -> None:
    for name, m in (("mean_before", mean_before), ("mean_after", mean_after)):
        if not isinstance(m, Tensor) or m.ndim < 2 or m.shape[-2] == 0 or m.shape[-1] == 0:
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m)
            raise ValueError(f"{name} must have shape [..., N, action_dim], got {shape}")
    if mean_before.shape != mean_after.shape:
        raise ValueError(
            f"policy means of shapes {tuple(mean_before.shape)} and {tuple(mean_after.shape)} "
            "differ: pass both policies' means on the same reference states"
        )


@torch.no_grad()
def policy_churn(mean_before: Tensor, mean_after: Tensor) -> Tensor:
    """C-CHAIN's policy churn of a Gaussian policy: the mean squared change of the policy mean,

        churn = 1 / (N D) * sum_n sum_j (mu_after(s_n)_j - mu_before(s_n)_j)^2,

    over ``N`` reference states and ``D`` action dimensions (Tang et al., ICML 2025: their
    continuous-action ``policy_churn``, and the loss :class:`~ppo_cbp.plasticity.c_chain.
    ChurnReduction` minimises). The authors log it between the network before and after the
    last minibatch step of each update; between consecutive PPO updates, pass the actor's
    means on the same states before and after the update. The std does not enter (see
    :func:`policy_kl` for a measure that includes it).

    :param mean_before: the earlier policy's means ``[..., N, D]`` on the reference states.
    :param mean_after: the later policy's means on the same states, same shape.
    :return: float64 tensor ``[...]``.
    """
    _check_policy_means(mean_before, mean_after)
    diff = mean_after.to(torch.float64) - mean_before.to(torch.float64)
    return diff.square().mean(dim=(-2, -1))


@torch.no_grad()
def policy_kl(
    mean_before: Tensor, log_std_before: Tensor, mean_after: Tensor, log_std_after: Tensor
) -> Tensor:
    """Mean over reference states of ``KL(pi_before(.|s) || pi_after(.|s))`` for diagonal
    Gaussian policies ``N(mu, diag(exp(log_std))^2)``:

        KL = sum_j [ log_std_after_j - log_std_before_j
                     + (exp(2 log_std_before_j) + (mu_before_j - mu_after_j)^2)
                       / (2 exp(2 log_std_after_j)) - 1/2 ],

    the direction of C-CHAIN's discrete-action churn (the cross-entropy of the current policy
    under the earlier one, which is this KL plus the earlier policy's entropy).

    :param mean_before, mean_after: ``[..., N, D]`` on the same reference states.
    :param log_std_before, log_std_after: ``[D]``, ``[..., D]`` (one per leading index, e.g.
        per seed) or ``[..., N, D]`` (state-dependent).
    :return: float64 tensor ``[...]``.
    """
    _check_policy_means(mean_before, mean_after)

    def as_state_shaped(log_std: Tensor, name: str) -> Tensor:
        log_std = log_std.to(torch.float64)
        if log_std.ndim < mean_before.ndim:
            log_std = log_std.unsqueeze(-2)
        try:
            torch.broadcast_shapes(log_std.shape, mean_before.shape)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(log_std.shape)} does not fit means of shape "
                f"{tuple(mean_before.shape)}"
            ) from None
        return log_std

    lb = as_state_shaped(log_std_before, "log_std_before")
    la = as_state_shaped(log_std_after, "log_std_after")
    diff = mean_before.to(torch.float64) - mean_after.to(torch.float64)
    per_dim = la - lb + (torch.exp(2 * lb) + diff.square()) / (2 * torch.exp(2 * la)) - 0.5
    return per_dim.sum(dim=-1).mean(dim=-1)


def max_over_windows(values: Sequence[float] | np.ndarray, window: int = 500) -> np.ndarray:
    """Maximum over non-overlapping windows of ``window`` consecutive values (host-side).

    Window i covers values ``[i * window, (i + 1) * window)``; a trailing incomplete window is
    dropped, as in the official plotting code (``get_max``). The paper's Extended Data Fig. 5c uses
    the per-update weight change and ``window = 500`` updates (about 1M environment steps).

    :param values: 1-D sequence of floats, or an array ``[..., n_updates]`` (windows along the last
        axis, e.g. one row per seed). Convert device tensors with ``.cpu()`` first.
    :param window: number of consecutive values per window, >= 1.
    :return: float64 array ``[..., n_updates // window]``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        raise ValueError("values must have at least one dimension")
    n_windows = array.shape[-1] // window
    trimmed = array[..., : n_windows * window]
    return trimmed.reshape(*array.shape[:-1], n_windows, window).max(axis=-1)


@torch.no_grad()
def plasticity_metrics(net: nn.Sequential, states: Tensor) -> dict[str, Tensor]:
    """Plasticity metrics of ``net`` on ``states`` (the last rollout's observations).

    * ``dead_units``: fraction of all hidden units (all layers together) active (> 0) on at
      most 1% of the states (the paper's RL definition);
    * ``dormant_ratio``: fraction of all hidden units whose tau-dormant score (ReDo, per layer)
      is <= 0.1;
    * ``effective_rank``, ``stable_rank``: of the last hidden layer's ``[states, features]``
      feature matrix (stable rank: singular values holding 99% of their sum);
    * ``feature_norm``: :func:`feature_norm` of the last hidden layer's features;
    * ``weight_magnitude/layer{i}`` (mean |W| of Linear layer i, output layer included) and
      ``weight_magnitude/overall`` (sum |W| / number of weights; biases excluded).

    The PPO trainer adds ``max_weight_change``, the largest, over the updates since the previous
    log, of one update's L1 weight change ``sum |W_after - W_before|`` over the net's Linear
    weights (biases excluded; the quantity of the paper's Extended Data Fig. 5c), and
    ``units_replaced``, the cumulative number of units reset by CBP/ReDo (0 without them),
    ``gradient_norm`` (:func:`gradient_norm` of the net's parameters on the last minibatch
    before the log, before clipping) and, for the policy, ``churn`` and ``kl``
    (:func:`policy_churn` and :func:`policy_kl` over the last update, on its rollout's states).

    The features are what the next layer reads (:func:`~ppo_cbp.nets.units.hidden_features`):
    a ReLU layer's ``[states, units]`` activations; on a CReLU network its ``[states, 2 * units]``
    outputs ``[relu(z), relu(-z)]``. The unit counts (``dead_units``, ``dormant_ratio``) are of
    units, on each unit's activation (:func:`unit_activations`; for CReLU ``|z| / 2``, as CBP and
    ReDo see it): a CReLU unit is dead only where ``z = 0`` (see :func:`dead_unit_mask`).

    All values are device tensors; the caller synchronises once.
    """
    layers = hidden_features(net, states)
    acts = [unit_activations(f, g) for f, g in layers]
    units = sum(h.shape[-1] for h in acts)
    dead = sum(dead_unit_mask(h, 0.01).sum() for h in acts) / units
    dormant = sum((dormant_scores(h) <= 0.1).sum() for h in acts) / units
    features = layers[-1][0]
    ranks = feature_rank_metrics(features)
    out = {
        "dead_units": dead,
        "dormant_ratio": dormant,
        "effective_rank": ranks["effective_rank"],
        "stable_rank": ranks["stable_rank"],
        "feature_norm": feature_norm(features),
    }
    mags = weight_magnitudes(net)
    for i, key in enumerate(k for k in mags if k != "overall"):
        out[f"weight_magnitude/layer{i}"] = mags[key]
    out["weight_magnitude/overall"] = mags["overall"]
    return out
