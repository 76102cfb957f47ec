import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import model.resample as resample
from model.geometry import Letterbox, letterbox_for, preprocess_image
from model.resample import resample_argmax_to_image, resample_masks_to_image, resample_to_image, valid_grid_hw

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _bilinear_border(grid: np.ndarray, gy: float, gx: float) -> float:
    """Bilinear value of a 2-D array at fractional (row, col), coordinates clamped to the border."""
    h, w = grid.shape
    gy = min(max(gy, 0.0), h - 1.0)
    gx = min(max(gx, 0.0), w - 1.0)
    y0, x0 = int(math.floor(gy)), int(math.floor(gx))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ay, ax = gy - y0, gx - x0
    top = (1 - ax) * grid[y0, x0] + ax * grid[y0, x1]
    bottom = (1 - ax) * grid[y1, x0] + ax * grid[y1, x1]
    return (1 - ay) * top + ay * bottom


@pytest.mark.parametrize(
    ("image_hw", "size", "resized"),
    [((480, 640), 384, (288, 384)), ((640, 480), 384, (384, 288)), ((100, 100), 64, (64, 64)),
     ((30, 50), 64, (38, 64)), ((1, 1000), 384, (1, 384)), ((10, 20), 64, (32, 64))],
)
def test_letterbox_for_sizes(image_hw, size, resized):
    box = letterbox_for(image_hw, size)
    assert box.resized_hw == resized
    assert box.valid_hw == resized
    assert box.image_hw == image_hw and box.input_size == size
    assert max(box.resized_hw) == size


def test_letterbox_rejects_bad_sizes():
    with pytest.raises(ValueError):
        letterbox_for((0, 10), 64)
    with pytest.raises(ValueError):
        letterbox_for((10, 10), 0)
    with pytest.raises(ValueError):
        Letterbox(image_hw=(10, 10), input_size=8, resized_hw=(9, 8))


def test_preprocess_image_resizes_normalises_and_pads():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    x, box = preprocess_image(array, 64, MEAN, STD)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert box.resized_hw == (38, 64)
    resized = np.asarray(Image.fromarray(array).resize((64, 38), Image.Resampling.BILINEAR), dtype=np.float64)
    expected = (resized / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x[:, :38, :].numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    assert torch.count_nonzero(x[:, 38:, :]) == 0


def test_preprocess_image_without_resize_is_exact_normalisation():
    array = np.random.default_rng(1).integers(0, 256, size=(64, 40, 3), dtype=np.uint8)
    x, box = preprocess_image(array, 64, MEAN, STD)
    assert box.resized_hw == (64, 40)
    expected = (array / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(x[:, :, :40].numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    assert torch.count_nonzero(x[:, :, 40:]) == 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_preprocess_image_converts_modes_to_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(20, 20, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    x, _ = preprocess_image(image, 20, MEAN, STD)
    expected, _ = preprocess_image(np.asarray(image.convert("RGB")), 20, MEAN, STD)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_preprocess_image_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((4, 4, 3), dtype=np.float32), 8, MEAN, STD)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        preprocess_image(np.zeros((4, 4), dtype=np.uint8), 8, MEAN, STD)
    with pytest.raises(ValueError):
        preprocess_image("not an image", 8, MEAN, STD)
    with pytest.raises(ValueError, match="std"):
        preprocess_image(np.zeros((4, 4, 3), dtype=np.uint8), 8, MEAN, (1.0, 0.0, 1.0))


def test_resample_without_letterbox_equals_interpolate():
    maps = torch.rand(5, 16, 16)
    box = letterbox_for((64, 64), 64)
    out = resample_to_image(maps, box)
    expected = F.interpolate(maps[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert out.shape == (5, 64, 64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_resample_matches_hand_computed_pixels():
    # (30, 50) image in a 64 input: resized (38, 64); a 16 x 16 grid.
    box = letterbox_for((30, 50), 64)
    grid = torch.rand(1, 16, 16, dtype=torch.float64)
    out = resample_to_image(grid, box)[0].numpy()
    assert out.shape == (30, 50)
    g = grid[0].numpy()
    for y, x in [(0, 0), (17, 23), (29, 49), (5, 41), (29, 0)]:
        gy = (y + 0.5) * (38 / (30 * 64)) * 16 - 0.5
        gx = (x + 0.5) * (64 / (50 * 64)) * 16 - 0.5
        assert out[y, x] == pytest.approx(_bilinear_border(g, gy, gx), abs=1e-12)


def test_resample_is_close_to_the_two_step_version():
    # Smooth maps: stretch to S x S, crop rh x rw, resize to H x W differs only by the second rounding.
    box = letterbox_for((45, 80), 64)  # resized (36, 64)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    maps = torch.stack([torch.sin(3 * yy) * torch.cos(2 * xx), yy * xx, torch.cos(4 * xx)])
    rh, rw = box.resized_hw
    full = F.interpolate(maps[None], size=(64, 64), mode="bilinear", align_corners=False)[:, :, :rh, :rw]
    two_step = F.interpolate(full, size=(45, 80), mode="bilinear", align_corners=False)[0]
    out = resample_to_image(maps, box)
    assert (out - two_step).abs().max() < 0.05
    assert (out - two_step).abs().mean() < 0.005


def test_resample_channels_and_row_chunks():
    box = letterbox_for((30, 50), 64)
    maps = torch.rand(2, 3, 16, 16)
    out = resample_to_image(maps, box)
    assert out.shape == (2, 3, 30, 50)
    torch.testing.assert_close(out[1, 2], resample_to_image(maps[1, 2][None], box)[0], atol=0, rtol=0)
    torch.testing.assert_close(resample_to_image(maps, box, rows=(7, 19)), out[:, :, 7:19], atol=0, rtol=0)
    assert resample_to_image(torch.zeros(0, 16, 16), box).shape == (0, 30, 50)


def test_resample_rejects_bad_maps():
    box = letterbox_for((30, 50), 64)
    with pytest.raises(ValueError, match="floating"):
        resample_to_image(torch.zeros(1, 4, 4, dtype=torch.bool), box)
    with pytest.raises(ValueError, match="shape"):
        resample_to_image(torch.zeros(4, 4), box)


@pytest.mark.parametrize(("image_hw", "size", "grid"), [((30, 50), 64, 16), ((64, 64), 64, 16), ((7, 300), 96, 12),
                                                         ((480, 640), 640, 80)])
def test_resample_masks_equals_thresholded_resample(image_hw, size, grid):
    g = torch.Generator().manual_seed(sum(image_hw))
    smooth = torch.nn.functional.interpolate(torch.rand(6, 1, 4, 4, generator=g), size=(grid, grid), mode="bilinear")
    probs = torch.cat([smooth[:, 0], torch.rand(3, grid, grid, generator=g), torch.full((1, grid, grid), 0.7)])
    box = letterbox_for(image_hw, size)
    masks = resample_masks_to_image(probs, box, 0.5)
    assert masks.dtype == torch.bool and masks.shape == (10, *image_hw)
    expected = resample_to_image(probs.double(), box) > 0.5
    assert torch.equal(masks, expected)
    assert masks[-1].all()
    assert 0 < masks[:6].float().mean() < 1  # the smooth maps straddle the threshold
    assert resample_masks_to_image(torch.zeros(0, grid, grid), box, 0.5).shape == (0, *image_hw)


@pytest.mark.parametrize(("image_hw", "size", "grid", "classes"),
                         [((30, 50), 64, 16, 5), ((64, 64), 64, 16, 3), ((7, 300), 96, 12, 9), ((48, 64), 64, 8, 40)])
def test_resample_argmax_equals_argmax_of_resample(image_hw, size, grid, classes, monkeypatch):
    g = torch.Generator().manual_seed(grid + classes)
    smooth = torch.nn.functional.interpolate(torch.randn(1, classes, 3, 3, generator=g), size=(grid, grid),
                                             mode="bilinear")[0]
    box = letterbox_for(image_hw, size)
    for maps in (smooth, torch.randn(classes, grid, grid, generator=g)):
        labels = resample_argmax_to_image(maps, box)
        assert labels.dtype == torch.int64 and labels.shape == image_hw
        expected = resample_to_image(maps.double(), box).argmax(dim=0)
        assert torch.equal(labels, expected)
        monkeypatch.setattr(resample, "_CHUNK_ELEMENTS", 1)  # one cell per chunk
        assert torch.equal(resample_argmax_to_image(maps, box), expected)
        monkeypatch.undo()


def test_resample_argmax_ties_go_to_the_lowest_index():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps[1] = maps[0]  # classes 0 and 1 tie everywhere, class 2 wins in places
    labels = resample_argmax_to_image(maps, letterbox_for((20, 30), 32))
    assert (labels == 0).any() and (labels == 2).any() and not (labels == 1).any()
    with pytest.raises(ValueError, match="C >= 1"):
        resample_argmax_to_image(torch.zeros(0, 8, 8), letterbox_for((20, 30), 32))


def test_valid_grid_hw():
    box = letterbox_for((30, 50), 64)  # resized (38, 64)
    assert valid_grid_hw(box, (16, 16)) == (10, 16)  # ceil(38 / 64 * 16) = ceil(9.5)
    assert valid_grid_hw(letterbox_for((64, 64), 64), (16, 16)) == (16, 16)
    assert valid_grid_hw(letterbox_for((1, 1000), 384), (48, 48)) == (1, 48)
    assert valid_grid_hw(letterbox_for((48, 64), 64), (16, 16)) == (12, 16)  # exact multiple: no extra row
