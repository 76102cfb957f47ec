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


def encode_patch_tokens(visual: nn.Module, images: torch.Tensor,
                        pos_embed: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """The official modified CLIP ViT forward (reference §1.2).

    ``images``: (B, 3, H, W) float, normalised. Trailing pixels that do not fill a patch are dropped.
    ``pos_embed``: the (1 + h*w, D) positional embedding of the image's patch grid, when the caller computed it
    (``interpolate_pos_embed``; an exported network takes it as an input); None: computed here.
    Returns ``(tokens, h, w)`` with tokens (B, h*w, D) after ``ln_post``, CLS removed, no projection.
    """
    x = visual.conv1(images)  # (B, D, h, w)
    b, d, h, w = x.shape
    x = x.flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, d).expand(b, 1, d)
    x = torch.cat([cls, x], dim=1)
    if pos_embed is None:
        pos_embed = interpolate_pos_embed(visual.positional_embedding, h, w)
    x = x + pos_embed.to(x.dtype)
    x = visual.ln_pre(x)
    x = visual.transformer(x)  # open_clip's Transformer takes and returns batch-first tokens
    x = visual.ln_post(x[:, 1:, :])
    return x, h, w


def _embed_image(visual: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(3, H, W) -> ((1 + h*w, D) CLS + patch tokens with positional embeddings, h, w): the official embedding."""
    patch = getattr(visual, "patch_size", (1, 1))
    if image.shape[-2] < patch[0] or image.shape[-1] < patch[1]:
        raise ValueError(f"an image of {tuple(image.shape[-2:])} pixels is smaller than one patch {tuple(patch)}")
    x = visual.conv1(image.unsqueeze(0))  # (1, D, h, w)
    _, d, h, w = x.shape
    x = x.reshape(d, h * w).t()
    x = torch.cat([visual.class_embedding.to(x.dtype).view(1, d), x], dim=0)
    return x + interpolate_pos_embed(visual.positional_embedding, h, w).to(x.dtype), h, w


def _min_rows(device: torch.device) -> int:
    """Shortest padded sequence for the ragged encoder on this device.

    CPU GEMMs split a matrix with few rows across threads differently (measured: rows changed in the last bits
    below about ``threads + 2`` rows), so a short sequence alone would not be computed like the same sequence
    inside a batch; padding every sequence to at least this many rows keeps an image's answer bitwise
    independent of its batch. GPUs give no bitwise guarantee anyway and pad nothing.
    """
    return max(64, 4 * torch.get_num_threads()) if device.type == "cpu" else 1


def _ragged_attention(attn: nn.MultiheadAttention, x: torch.Tensor,
                      groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Self-attention of ``nn.MultiheadAttention`` weights over (B, N, D) padded sequences, each image attending
    to its own tokens only (padding is masked out by never being read). ``groups``: ``(length, batch indices)``
    of the images with that many tokens; each group shares one ``scaled_dot_product_attention`` call. Padded rows
    of the result are zero."""
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3D): one GEMM for the whole batch
    out = x.new_zeros(b, n, d)
    for length, idx in groups:
        part = qkv.index_select(0, idx)[:, :length]  # (G, m, 3D), a contiguous copy
        q, k, v = (t.reshape(len(idx), length, heads, d // heads).transpose(1, 2) for t in part.chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v)  # (G, heads, m, D/heads)
        out[idx, :length] = o.transpose(1, 2).reshape(len(idx), length, d)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def encode_patch_tokens_ragged(visual: nn.Module,
                               images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The official encoder forward (reference §1.2) for images of different sizes in one pass.

    Each image is embedded at its own size (patch embedding, CLS, positional embedding interpolated to its own
    ``h x w`` grid), the token sequences are padded to a common length, and the transformer runs on the padded
    batch with every image attending only to its own tokens, so an image's tokens do not depend on the others
    (bitwise on CPU, see ``_min_rows``). Needs open_clip's pre-LN ``ResidualAttentionBlock``s.

    Args:
        visual: the open_clip vision tower.
        images: ``B`` tensors ``(3, H_i, W_i)``, normalised; trailing pixels that do not fill a patch are dropped.

    Returns:
        ``(tokens, grids)``: tokens ``(B, N, D)`` after ``ln_post``, CLS removed, image ``i``'s ``h_i * w_i``
        patch tokens first (row-major) and padding after; ``grids`` the ``(h_i, w_i)``.
    """
    if not images:
        raise ValueError("encode_patch_tokens_ragged needs at least one image")
    embedded, grids = [], []
    for image in images:
        tokens, h, w = _embed_image(visual, image)
        embedded.append(tokens)
        grids.append((h, w))
    lengths = [t.shape[0] for t in embedded]
    device = embedded[0].device
    groups = [(m, torch.tensor([i for i, k in enumerate(lengths) if k == m], device=device))
              for m in sorted(set(lengths))]
    n = max(max(lengths), _min_rows(device))
    x = embedded[0].new_zeros(len(images), n, embedded[0].shape[1])
    for i, tokens in enumerate(embedded):
        x[i, : lengths[i]] = tokens
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks:
        if hasattr(block, "ln_1_kv") or not isinstance(block.attn, nn.MultiheadAttention):
            raise ValueError("the ragged encoder needs open_clip's plain ResidualAttentionBlock")
        x = x + block.ls_1(_ragged_attention(block.attn, block.ln_1(x), groups))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = visual.ln_post(x[:, 1:])
    return x, grids


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
