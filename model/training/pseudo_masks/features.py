"""The feature extractors pseudo-mask voting runs on, and how to build them by name.

A feature extractor (``FeatureExtractor``) maps a PIL image to a ``(h, w, d)`` float tensor whose grid spans the
whole image. Which ones to use is the main quality/cost trade-off:

- ``ColourTextureFeatures`` (no weights, fast, fine grid): per-cell mean CIE-Lab colour and local lightness
  contrast. Good when the object differs from its surroundings in colour or texture (solid objects, clean
  backgrounds, the shapes world); splits multi-coloured objects and misses camouflaged ones. The honest baseline.
- ``ClipPatchFeatures`` (the retrieval CLIP, always at hand): last-layer patch tokens. Coarse (one token per
  14-16 px) and known to localise poorly when raw (docs: shapes-notes), so best as one voter among several.
- ``DinoFeatures`` (DINO ViT-S/16) and ``MocoFeatures`` (MoCo-v2 ResNet-50, dilated to stride 8): the
  self-supervised backbones SelfMask's own pseudo-labels were voted with; they need their weight files locally.

``timm`` and ``torchvision`` are imported only when a DINO or MoCo extractor is built: those two extractors are
optional (they need weight files few setups have), and importing ``timm`` alone costs seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.backbone import encode_patch_tokens
from model.clip_weights import load_state_strict, read_state_dict
from model.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

EXTRACTOR_NAMES = ("colour", "clip", "dino", "moco")


class FeatureExtractor(Protocol):
    """A callable ``PIL image -> (h, w, d) float tensor`` whose ``(h, w)`` grid spans the whole image."""

    def __call__(self, image: Any) -> torch.Tensor: ...


def _fit_grid(size_wh: tuple[int, int], long_cells: int) -> tuple[int, int]:
    """Grid ``(rows, cols)`` with ``long_cells`` along the image's longer side, aspect kept (each >= 1)."""
    width, height = size_wh
    scale = long_cells / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _normalised_tensor(image: Any, size_hw: tuple[int, int], mean: Sequence[float],
                       std: Sequence[float]) -> torch.Tensor:
    """PIL image -> float32 ``(1, 3, h, w)``, resized bicubic to ``size_hw`` and normalised per channel."""
    image = image.convert("RGB")
    if image.size != (size_hw[1], size_hw[0]):
        image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ``(3, H, W)`` -> CIE-Lab (D65 white), ``(3, H, W)``: L in [0, 100], a/b roughly +-100."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                           [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,jhw->ihw", to_xyz, linear) / white.view(3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta ** 3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta ** 2) + 4.0 / 29.0)
    return torch.stack([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


class ColourTextureFeatures:
    """Weight-free features: per-cell mean Lab colour and local lightness contrast, on a fine grid.

    The image is divided into a grid with ``grid`` cells along its longer side (never finer than 2 px). Each
    cell holds ``[(Lab - image mean) / colour_scale, (contrast - image mean) / texture_scale, 1]`` where
    ``contrast`` is the standard deviation of L in a ``texture_window``-pixel box around each pixel, averaged
    over the cell. Centring and the constant last channel make the graph's cosine affinity a similarity kernel
    (equal cells: 1, cells ``colour_scale`` Lab units apart: about 0.5) instead of an angle about black.
    Returns float32 ``(h, w, 5)``.
    """

    def __init__(self, grid: int = 64, texture_window: int = 7, colour_scale: float = 10.0,
                 texture_scale: float = 5.0) -> None:
        if grid < 1 or texture_window < 1 or colour_scale <= 0 or texture_scale <= 0:
            raise ValueError("grid, texture_window, colour_scale and texture_scale must be positive")
        self.grid, self.window = grid, texture_window
        self.colour_scale, self.texture_scale = colour_scale, texture_scale

    def __call__(self, image: Any) -> torch.Tensor:
        rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        lab = rgb_to_lab(rgb)
        lightness = lab[:1][None]
        pad = self.window // 2
        padded = F.pad(lightness, (pad, self.window - 1 - pad, pad, self.window - 1 - pad), mode="replicate")
        mean = F.avg_pool2d(padded, self.window, stride=1)
        mean_sq = F.avg_pool2d(padded ** 2, self.window, stride=1)
        contrast = (mean_sq - mean ** 2).clamp_min(0.0).sqrt()
        height, width = lab.shape[-2:]
        # No finer than 2 px per cell: the graph's 2x upsampling then gives at most one token per pixel.
        cells = _fit_grid((width, height), min(self.grid, max(1, math.ceil(max(height, width) / 2))))
        colour = F.adaptive_avg_pool2d(lab[None], cells)[0]
        texture = F.adaptive_avg_pool2d(contrast, cells)[0]
        colour = (colour - colour.mean(dim=(1, 2), keepdim=True)) / self.colour_scale
        texture = (texture - texture.mean(dim=(1, 2), keepdim=True)) / self.texture_scale
        return torch.cat([colour, texture, torch.ones_like(texture)]).permute(1, 2, 0).contiguous()


class ClipPatchFeatures:
    """Last-layer patch tokens of a CLIP ViT (``model.backbone.encode_patch_tokens``: ``ln_post``, no CLS, no
    projection). The image is resized so its longer side is ``input_size`` (default the tower's) with both sides
    whole patches. Returns float32 ``(h, w, width)`` on the tower's device.
    """

    def __init__(self, visual: torch.nn.Module, input_size: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> None:
        self.visual = visual.eval()
        self.patch = int(visual.patch_size[0])
        self.long_cells = max(1, (input_size or int(visual.image_size[0])) // self.patch)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Any) -> torch.Tensor:
        rows, cols = _fit_grid(image.size, self.long_cells)
        param = next(self.visual.parameters())
        x = _normalised_tensor(image, (rows * self.patch, cols * self.patch), self.mean, self.std)
        with torch.inference_mode():
            tokens, h, w = encode_patch_tokens(self.visual, x.to(param.device, param.dtype))
        return tokens[0].float().view(h, w, -1)


class DinoFeatures:
    """DINO ViT-S/16 (timm ``vit_small_patch16_224.dino``, loaded from a local file, e.g. Facebook's
    ``dino_deitsmall16_pretrain.pth``): last-layer patch tokens after the final LayerNorm, CLS removed. The image
    is resized so its longer side is about ``max_side`` pixels in whole patches. Returns float32 ``(h, w, 384)``.
    """

    patch = 16

    def __init__(self, weights: str | Path, max_side: int = 448, device: str | torch.device = "cpu") -> None:
        import timm  # optional extractor: see the module docstring

        state = read_state_dict(weights)  # FileNotFoundError naming the file
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith(("head.", "fc."))}
        self.model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0,
                                       dynamic_img_size=True)
        load_state_strict(self.model, state, f"DINO weights {weights}")
        self.model = self.model.to(device).eval()
        self.long_cells = max(1, max_side // self.patch)

    def __call__(self, image: Any) -> torch.Tensor:
        rows, cols = _fit_grid(image.size, self.long_cells)
        x = _normalised_tensor(image, (rows * self.patch, cols * self.patch), IMAGENET_MEAN, IMAGENET_STD)
        param = next(self.model.parameters())
        with torch.inference_mode():
            tokens = self.model.forward_features(x.to(param.device, param.dtype))
        return tokens[0, self.model.num_prefix_tokens:].float().view(rows, cols, -1)


class MocoFeatures:
    """MoCo-v2 ResNet-50 (torchvision layout, last two stages dilated: output stride 8), from a local file such
    as ``moco_v2_800ep_pretrain.pth.tar`` (``module.encoder_q.*`` keys; the MLP head is dropped). The image is
    resized so its longer side is about ``max_side`` pixels. Returns float32 ``(h, w, 2048)`` layer-4 features.
    """

    stride = 8

    def __init__(self, weights: str | Path, max_side: int = 320, device: str | torch.device = "cpu") -> None:
        import torchvision  # optional extractor: see the module docstring

        state = read_state_dict(weights)
        if any(k.startswith("encoder_q.") for k in state):
            state = {k.removeprefix("encoder_q."): v for k, v in state.items() if k.startswith("encoder_q.")}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        net.fc = torch.nn.Identity()
        load_state_strict(net, state, f"MoCo weights {weights}")
        self.net = net.to(device).eval()
        self.long_cells = max(1, max_side // self.stride)

    def __call__(self, image: Any) -> torch.Tensor:
        rows, cols = _fit_grid(image.size, self.long_cells)
        x = _normalised_tensor(image, (rows * self.stride, cols * self.stride), IMAGENET_MEAN, IMAGENET_STD)
        n = self.net
        param = next(n.parameters())
        with torch.inference_mode():
            y = n.maxpool(n.relu(n.bn1(n.conv1(x.to(param.device, param.dtype)))))
            y = n.layer4(n.layer3(n.layer2(n.layer1(y))))
        return y[0].float().permute(1, 2, 0).contiguous()


def build_extractors(names: Sequence[str], clip_visual: torch.nn.Module | None = None,
                     dino_weights: str | Path | None = None, moco_weights: str | Path | None = None,
                     device: str | torch.device = "cpu") -> dict[str, FeatureExtractor]:
    """Named extractors for ``names`` (a subset of ``EXTRACTOR_NAMES``); the weights each needs must be given."""
    extractors: dict[str, FeatureExtractor] = {}
    for name in names:
        if name == "colour":
            extractors[name] = ColourTextureFeatures()
        elif name == "clip":
            if clip_visual is None:
                raise ValueError("the clip extractor needs CLIP weights (--clip)")
            extractors[name] = ClipPatchFeatures(clip_visual)
        elif name == "dino":
            if dino_weights is None:
                raise ValueError("the dino extractor needs a DINO ViT-S/16 weights file (--dino)")
            extractors[name] = DinoFeatures(dino_weights, device=device)
        elif name == "moco":
            if moco_weights is None:
                raise ValueError("the moco extractor needs a MoCo-v2 ResNet-50 weights file (--moco)")
            extractors[name] = MocoFeatures(moco_weights, device=device)
        else:
            raise ValueError(f"unknown extractor {name!r}; choose from {', '.join(EXTRACTOR_NAMES)}")
    if not extractors:
        raise ValueError("at least one feature extractor is needed")
    return extractors


__all__ = ["FeatureExtractor", "EXTRACTOR_NAMES", "rgb_to_lab", "ColourTextureFeatures", "ClipPatchFeatures",
           "DinoFeatures", "MocoFeatures", "build_extractors"]
