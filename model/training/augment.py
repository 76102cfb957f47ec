"""The per-source augmentation of copy-paste synthesis (reference §4.3, supplementary B.2).

Geometry first, on the image and its instance map together (``augment_geometry``: random rescale, pad to the crop
size, random crop, horizontal flip), then photometry on the image alone (``augment_photometry``: colour jitter in
random order, grayscale, Gaussian blur, mean/std normalisation). Every random parameter is drawn from the numpy
generator passed in, in a fixed order, so that ``model.training.copy_paste`` can make each sample a pure function
of its index. The knobs are ``copy_paste.SynthesisParams``.

A conscious change from the release (reference §7.2): the padding corner is uniform (each 0.25) instead of the
release's skewed 0.25/0.19/0.14/0.42.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:  # for annotations only: copy_paste, which owns SynthesisParams, imports this module
    from model.training.copy_paste import SynthesisParams

_PAD = -1  # instance-map value of padding pixels (becomes ignore_index in the semantic target)


def augment_geometry(image: np.ndarray, instance_map: np.ndarray, rng: np.random.Generator,
                     p: SynthesisParams) -> tuple[np.ndarray, np.ndarray]:
    """Rescale (relative to the original size), pad to >= crop, random crop, horizontal flip.

    image uint8 (H,W,3) -> (S,S,3); instance_map int64 (H,W) -> (S,S) with padding = -1.
    Image resize is PIL bilinear (as the release), the map nearest; padding uses the scaled image's mean colour.
    """
    h, w = instance_map.shape
    s = rng.uniform(*p.scale_range)
    nh, nw = max(1, int(h * s)), max(1, int(w * s))
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
    instance_map = instance_map[rows[:, None], cols[None, :]]

    crop = p.crop_size
    if nh < crop or nw < crop:
        ph, pw = max(crop, nh), max(crop, nw)
        corner = int(rng.integers(4))  # uniform; the release's chained tests skew this (see module docstring)
        top = 0 if corner in (0, 1) else ph - nh
        left = 0 if corner in (0, 2) else pw - nw
        fill = np.round(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        padded = np.empty((ph, pw, 3), dtype=np.uint8)
        padded[:] = fill
        padded[top:top + nh, left:left + nw] = image
        padded_map = np.full((ph, pw), _PAD, dtype=np.int64)
        padded_map[top:top + nh, left:left + nw] = instance_map
        image, instance_map = padded, padded_map

    y0 = int(rng.integers(image.shape[0] - crop + 1))
    x0 = int(rng.integers(image.shape[1] - crop + 1))
    image, instance_map = image[y0:y0 + crop, x0:x0 + crop], instance_map[y0:y0 + crop, x0:x0 + crop]
    if rng.random() < p.hflip_prob:
        image, instance_map = image[:, ::-1], instance_map[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(instance_map)


def augment_photometry(image: np.ndarray, rng: np.random.Generator, p: SynthesisParams) -> torch.Tensor:
    """Colour jitter (random order), grayscale, Gaussian blur, then mean/std normalisation.

    image uint8 (S,S,3) -> float32 (3,S,S). Jitter and grayscale run on the uint8 PIL image, as in the release
    (and ~10x faster than on float tensors); parameters are drawn from ``rng`` (torchvision's own random
    transforms would use the global torch RNG, which a resumed or multi-worker run cannot reproduce).
    """
    # deferred: torchvision.transforms takes seconds to import (longer than the rest of the training code
    # together); only processes that augment samples, e.g. DataLoader workers, need it
    from torchvision.transforms.v2 import functional as TF

    pil = Image.fromarray(image)
    if rng.random() < p.jitter_prob:
        b, c, s, hue = p.jitter
        factors = [rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                   rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-hue, hue)]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in rng.permutation(4):
            pil = ops[i](pil, float(factors[i]))
    if rng.random() < p.grayscale_prob:
        pil = TF.rgb_to_grayscale(pil, num_output_channels=3)
    x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    if rng.random() < p.blur_prob:
        x = gaussian_blur(x, p.blur_kernel, float(rng.uniform(*p.blur_sigma)))
    mean = torch.tensor(p.image_mean).view(3, 1, 1)
    std = torch.tensor(p.image_std).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C,H,W) float with reflect padding: torchvision's ``gaussian_blur`` kernel and
    borders, as two 1-D convolutions (a 2-D 39x39 kernel is ~10x slower)."""
    half = (kernel_size - 1) * 0.5
    k = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size) / sigma) ** 2)
    k = k / k.sum()
    pad = kernel_size // 2
    y = F.pad(x[:, None], [pad, pad, pad, pad], mode="reflect")  # channels as the batch: (C,1,H+2p,W+2p)
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[:, 0]


__all__ = ["augment_geometry", "augment_photometry", "gaussian_blur"]
