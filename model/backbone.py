"""The CLIP towers ZUTIS is built on, from open_clip, and the modified vision forward of reference §1.2.

``build_vision_tower`` / ``build_text_tower`` construct randomly initialised open_clip towers from a
``ModelConfig``; weights come from a checkpoint afterwards. ``encode_patch_tokens`` is the official encoder
forward: positional embeddings re-interpolated on every call, CLS dropped, ``ln_post`` on the patch tokens and
no projection.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions replacing the ViT patch embedding: (B, 3, H, W) -> (B, width, H/2^n, W/2^n)."""

    def __init__(self, hidden: tuple[int, ...], width: int) -> None:
        super().__init__()
        chans = (3, *hidden, width)
        layers: list[nn.Module] = []
        for i in range(len(chans) - 1):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, stride=2, padding=1))
            if i < len(chans) - 2:
                layers.append(nn.GELU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_vision_tower(config: ModelConfig) -> nn.Module:
    """An open_clip ``VisionTransformer`` for ``config`` (random init), with the conv stem swapped in if set."""
    from open_clip.model import _build_vision_tower  # deferred: heavy import

    oc = config.open_clip_config()
    if "timm_model_name" in oc["vision_cfg"] or isinstance(oc["vision_cfg"].get("layers"), (list, tuple)):
        raise ValueError("ZUTIS needs a plain open_clip ViT image tower (no timm or ResNet towers)")
    visual = _build_vision_tower(oc["embed_dim"], oc["vision_cfg"], bool(oc.get("quick_gelu", False)))
    if config.conv_stem is not None:
        visual.conv1 = ConvStem(config.conv_stem, config.vision_width)
    return visual


def build_text_tower(config: ModelConfig) -> nn.Module:
    """An open_clip ``TextTransformer`` for ``config`` (random init); ``forward(tokens)`` gives (B, E) features."""
    from open_clip.model import _build_text_tower

    oc = config.open_clip_config()
    if oc["text_cfg"].get("hf_model_name"):
        raise ValueError("Hugging Face text towers are not supported: they need a download")
    return _build_text_tower(oc["embed_dim"], oc["text_cfg"], bool(oc.get("quick_gelu", False)))


def build_tokenizer(config: ModelConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's CLIP BPE tokenizer (vocabulary bundled with the package; nothing is downloaded).

    Returns a callable mapping ``list[str]`` to an int64 tensor ``(N, context_length)``.
    """
    from open_clip.tokenizer import SimpleTokenizer

    oc = config.open_clip_config()
    return SimpleTokenizer(context_length=int(oc["text_cfg"].get("context_length", 77)))


def interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize a CLIP positional embedding to an ``h x w`` patch grid the way the official code does.

    ``pos_embed``: (1 + g*g, D) with the CLS row first. Bicubic interpolation with
    ``scale_factor=((h + 0.1) / g, (w + 0.1) / g)`` (not ``size=``), applied even when ``h == w == g``.
    Returns (1 + h*w, D).
    """
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    g = int(round(grid.shape[0] ** 0.5))
    if g * g != grid.shape[0]:
        raise ValueError(f"positional embedding of {grid.shape[0]} patch rows is not a square grid")
    d = grid.shape[1]
    grid = grid.reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (h, w):  # the +0.1 exists to make this impossible (DINO issue #8)
        raise RuntimeError(f"positional embedding interpolated to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, d)
    return torch.cat([cls_row, grid], dim=0)


def encode_patch_tokens(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The official modified CLIP ViT forward (reference §1.2).

    ``images``: (B, 3, H, W) float, normalised. Trailing pixels that do not fill a patch are dropped.
    Returns ``(tokens, h, w)`` with tokens (B, h*w, D) after ``ln_post``, CLS removed, no projection.
    """
    x = visual.conv1(images)  # (B, D, h, w)
    b, d, h, w = x.shape
    x = x.reshape(b, d, h * w).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, d).expand(b, 1, d)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed(visual.positional_embedding, h, w).to(x.dtype)
    x = visual.ln_pre(x)
    x = visual.transformer(x)  # open_clip's Transformer takes and returns batch-first tokens
    x = visual.ln_post(x[:, 1:, :])
    return x, h, w


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(config: ModelConfig) -> dict[str, Any]:
    """A short human-readable description of the backbone for ``/info``."""
    oc = config.open_clip_config()
    return {
        "architecture": config.clip_model or "inline",
        "patch_size": config.patch_size,
        "vision_width": oc["vision_cfg"]["width"],
        "vision_layers": oc["vision_cfg"]["layers"],
        "embed_dim": oc["embed_dim"],
        "conv_stem": list(config.conv_stem) if config.conv_stem else None,
    }
