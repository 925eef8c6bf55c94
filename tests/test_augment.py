"""Device augmentation: flip, pad-and-crop and rotation checked pixel by pixel on known images."""

import math

import numpy as np
import pytest
import torch

from ppo_cbp.datasets.augment import (
    augment,
    augment_seeds,
    normalize,
    random_crop,
    random_flip,
    random_rotation,
    rotate,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def known_images(n, device, c=3, h=32, w=32):
    """Every pixel distinct: value = 10000 * image + 1000 * channel + 32 * row + column."""
    idx = torch.arange(n * c * h * w, dtype=torch.float64).view(n, c, h, w)
    img = torch.arange(n).view(n, 1, 1, 1) * 10000 + torch.arange(c).view(1, c, 1, 1) * 1000
    yx = torch.arange(h).view(1, 1, h, 1) * 32 + torch.arange(w).view(1, 1, 1, w)
    return (img + yx + 0 * idx).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_flip_is_a_left_right_mirror_with_the_generators_coin(device):
    x = known_images(64, device)
    g = torch.Generator(device=device).manual_seed(3)
    out = random_flip(x, g)
    coins = torch.rand(64, generator=torch.Generator(device=device).manual_seed(3), device=device)
    for n in range(64):
        # mirror by hand: column j of the output is column 31 - j of the input
        mirrored = x[n][:, :, list(range(31, -1, -1))]
        expected = mirrored if coins[n] < 0.5 else x[n]
        assert torch.equal(out[n], expected)
    flipped = int((coins < 0.5).sum())
    assert 16 < flipped < 48


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("device", DEVICES)
def test_crop_is_a_window_of_the_padded_image(device, mode):
    x = known_images(40, device)
    out = random_crop(x, torch.Generator(device=device).manual_seed(1), padding=4, mode=mode)
    assert out.shape == x.shape
    x_np = x.cpu().numpy()
    pad = np.pad(
        x_np, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect" if mode == "reflect" else "constant"
    )
    offsets = set()
    for n in range(40):
        found = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(out[n].cpu().numpy(), pad[n, :, dy : dy + 32, dx : dx + 32])
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 20  # offsets vary over the batch
    # same generator state -> same crops; the input is untouched
    again = random_crop(x, torch.Generator(device=device).manual_seed(1), padding=4, mode=mode)
    assert torch.equal(out, again) and torch.equal(x, known_images(40, device))


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_by_quarter_turns_and_zero(device):
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64, device=device)
    quarter = rotate(x, torch.full((5,), 90.0, dtype=torch.float64, device=device))
    # counter-clockwise as displayed: the top-right pixel comes from the bottom-right one
    expected = torch.stack(
        [torch.from_numpy(np.rot90(a, 1, axes=(1, 2)).copy()) for a in x.cpu().numpy()]
    )
    torch.testing.assert_close(quarter.cpu(), expected, rtol=0, atol=1e-10)
    same = rotate(x, torch.zeros(5, dtype=torch.float64, device=device))
    torch.testing.assert_close(same, x, rtol=0, atol=1e-12)
    # a small rotation moves pixels away from the centre only slightly, and keeps the centre
    centre = torch.zeros(1, 1, 33, 33, dtype=torch.float64, device=device)
    centre[0, 0, 16, 16] = 1.0
    r = rotate(centre, torch.tensor([10.0], dtype=torch.float64, device=device))
    assert r[0, 0, 16, 16].item() == pytest.approx(1.0, abs=1e-9)


def test_random_rotation_angles_in_range():
    # a single bright pixel at (row 16, col 30) of a 33x33 image, 14 pixels right of the centre
    x = torch.zeros(200, 1, 33, 33, dtype=torch.float64)
    x[:, 0, 16, 30] = 1.0
    g = torch.Generator().manual_seed(0)
    out = random_rotation(x, g, max_degrees=15.0)
    ys, xs = torch.meshgrid(
        torch.arange(33.0, dtype=torch.float64),
        torch.arange(33.0, dtype=torch.float64),
        indexing="ij",
    )
    mass = out.sum(dim=(1, 2, 3))
    cy = (out[:, 0] * ys).sum(dim=(1, 2)) / mass
    cx = (out[:, 0] * xs).sum(dim=(1, 2)) / mass
    angle = torch.rad2deg(torch.atan2(-(cy - 16), cx - 16))  # counter-clockwise, y up
    u = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 15
    # bilinear resampling blurs the pixel; the centroid angle follows the drawn angle closely
    torch.testing.assert_close(angle, u, rtol=0, atol=1.5)
    assert angle.min() > -1.5 and angle.max() < 16.5 and angle.std() > 3


def test_normalize_and_augment_shapes():
    x = torch.rand(7, 3, 32, 32)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    z = normalize(x, mean, std)
    for c in range(3):
        torch.testing.assert_close(z[:, c], (x[:, c] - mean[c]) / std[c])
    out = augment(z, torch.Generator().manual_seed(0))
    assert out.shape == z.shape and out.dtype == z.dtype
    out2 = augment(z, torch.Generator().manual_seed(0))
    assert torch.equal(out, out2)
    assert not torch.equal(out, augment(z, torch.Generator().manual_seed(1)))
    # with every transform off, augment is the identity
    ident = augment(z, torch.Generator().manual_seed(0), flip=0.0, padding=0, max_degrees=0.0)
    assert torch.equal(ident, z)
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment(torch.zeros(3, 32, 32))
    assert math.isfinite(out.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "settings", [{}, dict(padding=0), dict(max_degrees=0.0, pad_mode="zeros"), dict(flip=1.0)]
)
def test_augment_seeds_is_augment_of_each_seed_with_its_generator(device, settings):
    """Seed s's images come out as augment(x[:, s], generator s) and its generator ends in the
    same state; the seeds' draws differ."""
    S, B = 3, 10
    x = known_images(B * S, device).view(B, S, 3, 32, 32)
    gens = [torch.Generator(device=device).manual_seed(s) for s in (4, 9, 2)]
    out = augment_seeds(x, gens, **settings)
    assert out.shape == x.shape
    for s, seed in enumerate((4, 9, 2)):
        alone = torch.Generator(device=device).manual_seed(seed)
        want = augment(x[:, s], alone, **settings)
        torch.testing.assert_close(out[:, s], want, rtol=1e-12, atol=1e-9)
        assert torch.equal(alone.get_state(), gens[s].get_state())
    if settings.get("max_degrees", 1) > 0:
        assert not torch.equal(out[:, 0] - x[:, 0], out[:, 1] - x[:, 1])
    with pytest.raises(ValueError, match="expected images"):
        augment_seeds(x[:, :2], gens)
