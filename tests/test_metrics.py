"""Tests of ppo_cbp.metrics against values computed by hand or from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ppo_cbp.metrics import (
    WeightChangeTracker,
    _cumulative_share_rank,
    approximate_rank,
    average_weight_magnitude,
    conv_activations_as_samples,
    dead_unit_fraction,
    dead_unit_mask,
    dormant_ratio,
    dormant_scores,
    effective_rank,
    feature_rank_metrics,
    layer_weights,
    max_over_windows,
    stable_rank,
    unit_activity,
    weight_magnitudes,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _with_singular_values(sigma: list[float], n_rows: int, seed: int = 0) -> torch.Tensor:
    """A dense n_rows x len(sigma) float64 matrix U diag(sigma) V^T with random orthogonal U, V."""
    k = len(sigma)
    u = _orthogonal(n_rows, seed)[:, :k]
    v = _orthogonal(k, seed + 1)
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def _erank_by_hand(sigma: list[float]) -> float:
    total = sum(sigma)
    return math.exp(-sum(s / total * math.log(s / total) for s in sigma if s > 0))


# --------------------------------------------------------------------------------------------------
# Effective rank
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 4, 7])
def test_effective_rank_of_identity_is_n(device, dtype, n):
    result = effective_rank(torch.eye(n, dtype=dtype, device=device))
    assert result.device.type == device
    assert result.dtype == torch.float64
    assert result.shape == ()
    assert result.item() == pytest.approx(n, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_effective_rank_of_outer_product_is_one(device):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(30, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 8, generator=g, dtype=torch.float64)
    assert effective_rank((u @ v).to(device)).item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_effective_rank_of_diag_1100_is_two(device):
    matrix = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], device=device))
    assert effective_rank(matrix).item() == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_effective_rank_matches_entropy_by_hand(device):
    # sigma = (3, 1): p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7547...
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert expected == pytest.approx(_erank_by_hand([3.0, 1.0]))
    matrix = _with_singular_values([3.0, 1.0], n_rows=5).to(device)
    assert effective_rank(matrix).item() == pytest.approx(expected, rel=1e-12)
    sigma = [5.0, 2.0, 1.0, 0.25]
    matrix = _with_singular_values(sigma, n_rows=9, seed=3).to(device)
    assert effective_rank(matrix).item() == pytest.approx(_erank_by_hand(sigma), rel=1e-12)
    # Tall and wide versions of the same matrix (q = max(n, m) vs min(n, m) singular values).
    assert effective_rank(matrix.T).item() == pytest.approx(_erank_by_hand(sigma), rel=1e-12)


def test_effective_rank_is_invariant_to_orthogonal_transforms():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 6, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 6)
    rotated = _orthogonal(12, 5) @ a @ _orthogonal(6, 6)
    assert effective_rank(rotated).item() == pytest.approx(effective_rank(a).item(), rel=1e-10)
    assert stable_rank(rotated).item() == stable_rank(a).item()


def test_effective_rank_of_float32_input_uses_float64_svd():
    # A float32 matrix with a dynamic range that float32 singular values would blur.
    sigma = [1.0, 1e-4, 1e-5]
    matrix64 = _with_singular_values(sigma, n_rows=4, seed=7)
    matrix32 = matrix64.to(torch.float32)
    expected = effective_rank(matrix32.to(torch.float64)).item()
    assert effective_rank(matrix32).item() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_effective_rank_of_zero_matrix_is_zero_not_nan(device):
    assert effective_rank(torch.zeros(5, 3, device=device)).item() == 0.0
    batch = torch.stack([torch.zeros(4, 4), torch.eye(4)]).to(device)
    assert effective_rank(batch).tolist() == pytest.approx([0.0, 4.0], rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_metrics_batched_equal_per_matrix(device):
    g = torch.Generator().manual_seed(2)
    batch = torch.randn(2, 3, 20, 6, generator=g) * torch.tensor([5.0, 2.0, 1.0, 0.1, 0.01, 0.0])
    batch = batch.to(device)
    results = {
        "effective_rank": effective_rank(batch),
        "stable_rank": stable_rank(batch),
        "approximate_rank": approximate_rank(batch),
    }
    combined = feature_rank_metrics(batch)
    assert combined.keys() == results.keys()
    for name, values in results.items():
        assert values.shape == (2, 3)
        assert values.device.type == device
        assert torch.equal(combined[name], values)
        for i in range(2):
            for j in range(3):
                single = {
                    "effective_rank": effective_rank,
                    "stable_rank": stable_rank,
                    "approximate_rank": approximate_rank,
                }[name](batch[i, j])
                torch.testing.assert_close(values[i, j], single, rtol=1e-12, atol=0)
    assert results["stable_rank"].dtype == torch.int64
    assert results["approximate_rank"].dtype == torch.int64
    assert results["effective_rank"].dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Stable and approximate rank
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_stable_rank_by_hand(device):
    # Shares of the singular-value sum (100): 0.5, 0.989, 0.995, 1.0 -> first >= 0.99 at k = 3.
    matrix = _with_singular_values([50.0, 48.9, 0.6, 0.5], n_rows=6).to(device)
    assert stable_rank(matrix).item() == 3
    # Shares 0.5, 0.991, ... -> k = 2.
    matrix = _with_singular_values([50.0, 49.1, 0.5, 0.4], n_rows=6).to(device)
    result = stable_rank(matrix)
    assert result.item() == 2
    assert result.device.type == device
    # Other thresholds on the same matrix: 0.3 -> 1, 0.6 -> 2, 0.995 -> 3 (share 0.996).
    assert stable_rank(matrix, threshold=0.3).item() == 1
    assert stable_rank(matrix, threshold=0.6).item() == 2
    assert stable_rank(matrix, threshold=0.995).item() == 3


def test_stable_rank_tie_uses_greater_or_equal():
    # Exactly 99% in the top two: the official "sum(cumsum / total < 0.99) + 1" gives 2; the
    # paper's strict "> 0.99" would give 3.
    sigma = torch.tensor([50.0, 49.0, 0.5, 0.5], dtype=torch.float64)
    assert _cumulative_share_rank(sigma, 0.99).item() == 2


def test_cumulative_share_rank_never_exceeds_number_of_values():
    # Ten values of 0.1: with threshold 1 every value is needed, even if the last cumulative share
    # rounds to just below 1.
    values = torch.full((10,), 0.1, dtype=torch.float64)
    assert _cumulative_share_rank(values, 1.0).item() == 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "expected"), [(1, 1), (50, 50), (99, 99), (150, 149)])
def test_stable_rank_of_identity(device, n, expected):
    # k / n >= 0.99 first at k = ceil(0.99 n): n for n < 100, 149 for n = 150 (148/150 = 0.9867).
    assert stable_rank(torch.eye(n, device=device)).item() == expected
    assert approximate_rank(torch.eye(n, device=device)).item() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_approximate_rank_differs_from_stable_rank(device):
    # sigma = (10, 1, 1). Stable: 10/12 = 0.833, 11/12 = 0.917, 1 -> 3.
    # Approximate: 100/102 = 0.980, 101/102 = 0.990196 -> 2.
    matrix = _with_singular_values([10.0, 1.0, 1.0], n_rows=5).to(device)
    assert stable_rank(matrix).item() == 3
    assert approximate_rank(matrix).item() == 2
    metrics = feature_rank_metrics(matrix)
    assert metrics["stable_rank"].item() == 3
    assert metrics["approximate_rank"].item() == 2
    assert metrics["effective_rank"].item() == pytest.approx(
        _erank_by_hand([10.0, 1.0, 1.0]), rel=1e-12
    )


def test_ranks_of_zero_matrix_are_zero():
    zero = torch.zeros(6, 4)
    assert stable_rank(zero).item() == 0
    assert approximate_rank(zero).item() == 0
    assert feature_rank_metrics(zero)["effective_rank"].item() == 0.0


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_rank_threshold_out_of_range_raises(threshold):
    with pytest.raises(ValueError, match="threshold"):
        stable_rank(torch.eye(3), threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        approximate_rank(torch.eye(3), threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        feature_rank_metrics(torch.eye(3), threshold=threshold)


def test_rank_bad_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        effective_rank(torch.ones(5))
    with pytest.raises(ValueError, match="empty"):
        stable_rank(torch.ones(0, 3))


# --------------------------------------------------------------------------------------------------
# Dead units
# --------------------------------------------------------------------------------------------------


def _dead_unit_activations(n_samples: int = 200) -> torch.Tensor:
    """Columns: all zero; active on 1, 2, 3 and all samples; negative (non-zero) on 1 sample."""
    h = torch.zeros(n_samples, 6)
    h[17, 1] = 0.3
    h[[5, 150], 2] = 1.0
    h[[0, 1, 2], 3] = 2.0
    h[:, 4] = torch.linspace(0.1, 1.0, n_samples)
    h[9, 5] = -0.7
    return h


@pytest.mark.parametrize("device", DEVICES)
def test_unit_activity_counts_nonzero_samples(device):
    h = _dead_unit_activations().to(device)
    activity = unit_activity(h)
    assert activity.device.type == device
    assert activity.dtype == torch.float64
    assert activity.tolist() == [0.0, 1 / 200, 2 / 200, 3 / 200, 1.0, 1 / 200]


@pytest.mark.parametrize("device", DEVICES)
def test_dead_units_by_hand(device):
    h = _dead_unit_activations().to(device)
    # Zero on every sample: only column 0.
    assert dead_unit_mask(h).tolist() == [True, False, False, False, False, False]
    fraction = dead_unit_fraction(h)
    assert fraction.device.type == device
    assert fraction.item() == pytest.approx(1 / 6, rel=1e-15)
    # Active on at most 1% of 200 samples (<= 2 samples; 2/200 is exactly on the threshold).
    assert dead_unit_mask(h, max_active_fraction=0.01).tolist() == [
        True,
        True,
        True,
        False,
        False,
        True,
    ]
    assert dead_unit_fraction(h, max_active_fraction=0.01).item() == pytest.approx(4 / 6, rel=1e-15)


def test_unit_active_once_in_100_samples():
    h = torch.zeros(100, 2)
    h[42, 0] = 1.0
    h[:, 1] = 1.0
    # Active once: not dead by "zero on every sample", dead by "active on <= 1% of samples".
    assert dead_unit_mask(h).tolist() == [False, False]
    assert dead_unit_mask(h, max_active_fraction=0.01).tolist() == [True, False]


@pytest.mark.parametrize("device", DEVICES)
def test_dead_units_batched_equal_per_seed(device):
    g = torch.Generator().manual_seed(3)
    h = torch.relu(torch.randn(3, 2, 100, 8, generator=g) - 1.5)
    h[0, 1, :, 2] = 0.0
    h[2, 0, :, 5] = 0.0
    h = h.to(device)
    for fraction in (0.0, 0.05):
        batched = dead_unit_fraction(h, fraction)
        assert batched.shape == (3, 2)
        masks = dead_unit_mask(h, fraction)
        assert masks.shape == (3, 2, 8)
        for i in range(3):
            for j in range(2):
                assert torch.equal(masks[i, j], dead_unit_mask(h[i, j], fraction))
                assert batched[i, j].item() == dead_unit_fraction(h[i, j], fraction).item()
    assert dead_unit_mask(h)[0, 1, 2] and dead_unit_mask(h)[2, 0, 5]


@pytest.mark.parametrize("max_active_fraction", [-0.01, 1.0, 2.0])
def test_dead_unit_fraction_bad_threshold_raises(max_active_fraction):
    with pytest.raises(ValueError, match="max_active_fraction"):
        dead_unit_fraction(torch.zeros(4, 3), max_active_fraction)


def test_activation_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        dead_unit_fraction(torch.zeros(5))
    with pytest.raises(ValueError, match="at least one sample"):
        dormant_ratio(torch.zeros(0, 5))
    with pytest.raises(ValueError, match=r"\[\.\.\., N, C, H, W\]"):
        conv_activations_as_samples(torch.zeros(2, 3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_conv_activations_as_samples_layout(device):
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32, device=device).reshape(2, 3, 4, 5)
    rows = conv_activations_as_samples(x)
    assert rows.shape == (2 * 4 * 5, 3)
    assert rows.device.type == device
    for n in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(5):
                    assert rows[n * 20 + i * 5 + j, c] == x[n, c, i, j]
    # Leading seed dimension is kept.
    batched = conv_activations_as_samples(torch.stack([x, -x]))
    assert batched.shape == (2, 40, 3)
    assert torch.equal(batched[1], -rows)


def test_conv_dead_units_count_sample_position_pairs():
    # 10 images of 4x4: 160 (sample, position) pairs. Channel 0 is non-zero at one pair, channel 1
    # at two pairs, channel 2 nowhere. Under "<= 1%" (1.6 pairs) channels 0 and 2 are dead.
    x = torch.zeros(10, 3, 4, 4)
    x[3, 0, 1, 2] = 1.0
    x[0, 1, 0, 0] = 1.0
    x[9, 1, 3, 3] = 1.0
    rows = conv_activations_as_samples(x)
    assert unit_activity(rows).tolist() == [1 / 160, 2 / 160, 0.0]
    assert dead_unit_mask(rows, 0.01).tolist() == [True, False, True]
    assert dead_unit_mask(rows).tolist() == [False, False, True]


# --------------------------------------------------------------------------------------------------
# Dormant units
# --------------------------------------------------------------------------------------------------

# Per-unit E|h|; the layer mean is exactly 1, so s_i = E|h_i| / (1 + 1e-9).
_MEAN_ABS = [0.0, 0.0625, 0.125, 0.25, 1.5625, 1.0, 1.0, 2.0, 2.0, 2.0]


def _dormant_activations(dtype: torch.dtype) -> torch.Tensor:
    # Four samples per unit with mixed signs and mean |h| = v: (2v, 0, -v, v).
    v = torch.tensor(_MEAN_ABS, dtype=dtype)
    return torch.stack([2 * v, 0 * v, -v, v])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dormant_scores_by_hand(device, dtype):
    scores = dormant_scores(_dormant_activations(dtype).to(device))
    assert scores.device.type == device
    assert scores.dtype == dtype
    expected = [v / (1.0 + 1e-9) for v in _MEAN_ABS]
    assert scores.tolist() == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("tau", "n_dormant"),
    [
        (0.0, 1),  # only the all-zero unit (score exactly 0, "<=" boundary)
        (0.1, 2),  # 0 and 0.0625
        (0.125, 3),  # the unit with score equal to tau is dormant
        (0.2, 3),
        (0.25, 4),
        (1.0, 6),  # both units at exactly the layer mean
        (2.0, 10),
    ],
)
def test_dormant_ratio_by_hand(device, dtype, tau, n_dormant):
    ratio = dormant_ratio(_dormant_activations(dtype).to(device), tau=tau)
    assert ratio.device.type == device
    assert ratio.dtype == torch.float64
    assert ratio.item() == pytest.approx(n_dormant / 10, rel=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_dormant_all_zero_layer_is_fully_dormant(device):
    h = torch.zeros(7, 5, device=device)
    scores = dormant_scores(h)
    assert not torch.isnan(scores).any()
    assert scores.tolist() == [0.0] * 5
    assert dormant_ratio(h, tau=0.0).item() == 1.0
    assert dormant_ratio(h).item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_dormant_batched_equal_per_seed(device):
    g = torch.Generator().manual_seed(4)
    h = torch.relu(torch.randn(4, 64, 16, generator=g)) * torch.rand(4, 1, 16, generator=g)
    h = h.to(device)
    batched = dormant_ratio(h, tau=0.3)
    assert batched.shape == (4,)
    for i in range(4):
        assert torch.equal(dormant_scores(h)[i], dormant_scores(h[i]))
        assert batched[i].item() == dormant_ratio(h[i], tau=0.3).item()


def test_dormant_ratio_negative_tau_raises():
    with pytest.raises(ValueError, match="tau"):
        dormant_ratio(torch.ones(3, 3), tau=-0.1)


# --------------------------------------------------------------------------------------------------
# Weight magnitude
# --------------------------------------------------------------------------------------------------


def _two_layer_net(device: str = "cpu") -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4), nn.Linear(4, 2)).to(device)
    with torch.no_grad():
        net[0].weight.fill_(1.0)  # 12 weights, sum |w| = 12
        net[3].weight.fill_(-3.0)  # 8 weights, sum |w| = 24
        net[0].bias.fill_(100.0)
        net[3].bias.fill_(-100.0)
        net[2].weight.fill_(50.0)  # LayerNorm scale: a vector, not a layer weight
        net[2].bias.fill_(50.0)
    return net


@pytest.mark.parametrize("device", DEVICES)
def test_weight_magnitudes_per_layer_and_overall(device):
    net = _two_layer_net(device)
    result = weight_magnitudes(net)
    assert list(result) == ["0.weight", "3.weight", "overall"]
    assert result["0.weight"].item() == 1.0
    assert result["3.weight"].item() == 3.0
    # (12 + 24) / 20 = 1.8, not the mean of the per-layer means (2.0).
    assert result["overall"].item() == pytest.approx(1.8, rel=1e-15)
    assert all(v.device.type == device and v.dtype == torch.float64 for v in result.values())
    weights = [w for _, w in layer_weights(net)]
    assert average_weight_magnitude(weights).item() == pytest.approx(1.8, rel=1e-15)
    assert average_weight_magnitude(net[3].weight).item() == 3.0


def test_average_weight_magnitude_of_random_weights_matches_numpy():
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(30, 7, generator=g), torch.randn(2, 3, 5, 5, generator=g)]
    flat = np.concatenate([w.numpy().astype(np.float64).ravel() for w in weights])
    assert average_weight_magnitude(weights).item() == pytest.approx(np.abs(flat).mean(), rel=1e-14)


class _SeedBatchedLinear(nn.Module):
    def __init__(self, seeds: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(seeds, n_out, n_in))
        self.bias = nn.Parameter(torch.full((seeds, n_out), 7.0))


@pytest.mark.parametrize("device", DEVICES)
def test_weight_magnitudes_per_seed(device):
    net = nn.Sequential(_SeedBatchedLinear(3, 4, 5), nn.ReLU(), _SeedBatchedLinear(3, 5, 2))
    with torch.no_grad():
        for s in range(3):
            net[0].weight[s].fill_(s + 1.0)  # 20 weights of magnitude s + 1
            net[2].weight[s].fill_(-(s + 1.0) * 10)  # 10 weights of magnitude 10 (s + 1)
    net = net.to(device)
    result = weight_magnitudes(net, seed_dims=1)
    assert result["0.weight"].tolist() == [1.0, 2.0, 3.0]
    assert result["2.weight"].tolist() == [10.0, 20.0, 30.0]
    # Per seed: (20 (s+1) + 100 (s+1)) / 30 = 4 (s+1).
    assert result["overall"].tolist() == pytest.approx([4.0, 8.0, 12.0], rel=1e-15)
    assert result["overall"].device.type == device
    weights = [net[0].weight, net[2].weight]
    assert average_weight_magnitude(weights, seed_dims=1).tolist() == pytest.approx(
        [4.0, 8.0, 12.0], rel=1e-15
    )


def test_weight_magnitude_errors():
    with pytest.raises(ValueError, match="no layer weights"):
        weight_magnitudes(nn.ReLU())
    with pytest.raises(ValueError, match="no weight tensors"):
        average_weight_magnitude([])
    with pytest.raises(ValueError, match="seed shape"):
        average_weight_magnitude([torch.ones(2, 3, 3), torch.ones(3, 3, 3)], seed_dims=1)
    with pytest.raises(ValueError, match="seed_dims"):
        average_weight_magnitude(torch.ones(3, 3), seed_dims=-1)


# --------------------------------------------------------------------------------------------------
# Weight change
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_weight_change_of_known_perturbation(device):
    net = _two_layer_net(device)
    tracker = WeightChangeTracker(net)
    buffer_pointers = [b.data_ptr() for b in tracker._buffers]
    tracker.snapshot()
    delta = torch.tensor([[0.5, -0.5, 0.25], [0.0, 1.0, -2.0], [0, 0, 0], [0, 0, 0.125]])
    with torch.no_grad():
        net[0].weight.add_(delta.to(device))
        net[3].weight[1, 2] -= 4.0
        net[0].bias.add_(10.0)  # biases are not tracked
        net[2].weight.add_(10.0)  # nor are LayerNorm scales
    change = tracker.change()
    expected = 0.5 + 0.5 + 0.25 + 1.0 + 2.0 + 0.125 + 4.0
    assert change.item() == pytest.approx(expected, rel=1e-12)
    assert change.device.type == device
    assert change.dtype == torch.float64
    assert tracker.change().item() == change.item()  # change() keeps the snapshot
    # A new snapshot reuses the same buffers and resets the reference point.
    tracker.snapshot()
    assert [b.data_ptr() for b in tracker._buffers] == buffer_pointers
    assert tracker.change().item() == 0.0
    with torch.no_grad():
        net[3].weight[0, 0] += 1.5
    assert tracker.change().item() == 1.5


def test_weight_change_of_optimizer_step():
    # One SGD step with lr 0.5 on loss = sum(W): every entry moves by 0.5.
    layer = nn.Linear(6, 5, bias=False)
    tracker = WeightChangeTracker([layer.weight])
    tracker.snapshot()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.weight.sum().backward()
    optimizer.step()
    assert tracker.change().item() == pytest.approx(30 * 0.5, rel=1e-6)


def test_weight_change_per_seed():
    weights = [torch.zeros(2, 3, 3), torch.zeros(2, 4, 3)]
    tracker = WeightChangeTracker(weights, seed_dims=1)
    tracker.snapshot()
    weights[0][1] += 1.0  # seed 1: 9
    weights[1][0, 0, 0] = -2.0  # seed 0: 2
    assert tracker.change().tolist() == [2.0, 9.0]


def test_weight_change_errors():
    tracker = WeightChangeTracker(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="before snapshot"):
        tracker.change()
    with pytest.raises(ValueError, match="no layer weights"):
        WeightChangeTracker(nn.ReLU())
    with pytest.raises(ValueError, match="no weight tensors"):
        WeightChangeTracker([])


def test_max_over_windows_by_hand():
    values = [1.0, 5.0, 2.0, 3.0, 9.0, 0.0, 7.0]
    # Windows [1, 5, 2], [3, 9, 0]; the incomplete window [7] is dropped.
    assert max_over_windows(values, window=3).tolist() == [5.0, 9.0]
    assert max_over_windows(values, window=1).tolist() == values
    assert max_over_windows(values, window=8).tolist() == []
    per_seed = np.array([[1.0, 4.0, 2.0, 8.0], [-1.0, -3.0, 0.5, 0.25]])
    assert max_over_windows(per_seed, window=2).tolist() == [[4.0, 8.0], [-1.0, 0.5]]
    updates = np.arange(1200.0)[::-1]
    assert max_over_windows(updates).tolist() == [1199.0, 699.0]


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_max_over_windows_bad_window_raises(window):
    with pytest.raises(ValueError, match="window"):
        max_over_windows([1.0, 2.0], window=window)


def test_a_diverged_matrix_has_nan_rank_and_the_others_keep_theirs():
    """A stack with one non-finite matrix (a diverged seed's features): its ranks are NaN (the
    integer ranks -1) instead of an SVD failure, the finite ones' are unchanged."""
    good = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    bad = good.clone()
    bad[0, 1] = float("nan")
    worse = good.clone()
    worse[2, 2] = float("inf")
    got = feature_rank_metrics(
        torch.stack([good, bad, worse, torch.zeros(3, 3, dtype=torch.float64)])
    )
    alone = feature_rank_metrics(good)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert got["effective_rank"][0].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item())
    assert got["effective_rank"][0] == alone["effective_rank"]
    assert got["effective_rank"][1:3].isnan().all() and got["effective_rank"][3] == 0
    for key in ("stable_rank", "approximate_rank"):
        assert got[key][0] == alone[key] and got[key][3] == 0
        assert (got[key][1:3] == -1).all()
