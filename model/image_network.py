"""ZUTIS's image network (encoder + mask decoder + text-space projection) as one exportable graph.

``ZUTIS.forward`` computes, per call, things that depend only on the image's size (the positional embedding
re-interpolated to its patch grid, the decoder's sine encoding) and loops over the images of a batch. An
exported graph (ONNX, OpenVINO) should hold neither shape-dependent Python nor loops, so ``ImageNetwork`` takes
those size-only tensors as inputs (``network_inputs`` makes them) and runs one image:

    inputs:  image (1, 3, H, W) float32, normalised with the checkpoint's mean/std
             pos_embed (1 + h*w, D) float32, mask_pos (h'*w', 1, D) float32   (``network_inputs``)
    outputs: mask_probs (1, Q, h'*w') sigmoid mask probabilities
             text_proj (1, h'*w', E) the upsampled tokens projected into CLIP's text space, NOT yet normalised

with (h, w) the patch grid and (h', w') = (2h, 2w). ``finish_outputs`` turns the outputs into what
``ZUTIS.forward`` returns (the text-space layer norm over the valid region and the unit norm, in float32).
Text embeddings enter only in post-processing, so one exported file serves every vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import encode_patch_tokens, interpolate_pos_embed
from model.decoder import sine_position_encoding
from model.network import ZUTIS, normalise_text_space

INPUT_NAMES = ("image", "pos_embed", "mask_pos")
OUTPUT_NAMES = ("mask_probs", "text_proj")


class ImageNetwork(nn.Module):
    """``ZUTIS`` (inference mode) for one image with its size-only tensors as inputs; see the module docstring."""

    def __init__(self, model: ZUTIS) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor, pos_embed: torch.Tensor,
                mask_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        tokens, h, w = encode_patch_tokens(model.encoder, image, pos_embed)  # (1, h*w, D)
        grid = tokens.transpose(1, 2).unflatten(2, (h, w))  # (1, D, h, w)
        grid = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)
        up = grid.flatten(2).transpose(1, 2).contiguous()  # (1, h'w', D)
        pos = mask_pos.to(up.dtype)
        probs = model._mask_probs(model._mask_features(up, pos), pos, all_layers=False)  # (1, 1, Q, h'w')
        text_proj = up @ model.encoder.proj.to(up.dtype)  # (1, h'w', E)
        return probs[:, 0], text_proj


def patch_grid(model: ZUTIS, height: int, width: int) -> tuple[int, int]:
    """The encoder's patch grid (h, w) for an (height, width) input: ``floor(H / p)`` for a ViT patch embedding,
    ``ceil(H / 2)`` per stride-2 convolution of a conv stem."""
    if model.config.conv_stem is None:
        p = model.config.patch_size
        return height // p, width // p
    for _ in range(len(model.config.conv_stem) + 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


def network_inputs(model: ZUTIS, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The size-only inputs of ``ImageNetwork`` for an (height, width) image: ``pos_embed`` (1 + h*w, D), the
    checkpoint's positional embedding interpolated to the patch grid as the official code does, and ``mask_pos``
    (4*h*w, 1, D), the decoder's sine encoding of the upsampled grid. float32 on the model's device."""
    h, w = patch_grid(model, height, width)
    if h < 1 or w < 1:
        raise ValueError(f"an image of {height} x {width} pixels is smaller than one patch")
    with torch.no_grad():
        pos_embed = interpolate_pos_embed(model.encoder.positional_embedding.float(), h, w)
    d = pos_embed.shape[1]
    mask_pos = sine_position_encoding(1, d, 2 * h, 2 * w, pos_embed.device).flatten(2).permute(2, 0, 1)
    return pos_embed, mask_pos.contiguous()


def example_inputs(model: ZUTIS, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A zero image of (height, width) and its size-only inputs: what an exporter traces with."""
    return (torch.zeros(1, 3, height, width), *network_inputs(model, height, width))


def finish_outputs(mask_probs: list[torch.Tensor], text_proj: list[torch.Tensor],
                   valid_grid: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                            list[tuple[int, int]] | None]:
    """Per-image network outputs -> batched ``(mask_probs (B, Q, H', W'), semantic_features (B, H', W', E),
    grid_hw)`` as ``ZUTIS.forward`` / ``forward_ragged`` return them.

    ``mask_probs[i]`` (Q, h'_i, w'_i) and ``text_proj[i]`` (h'_i, w'_i, E) are image ``i``'s outputs;
    ``valid_grid[i]`` the rows and columns of its grid over the image (letterbox: the statistics region of the
    text-space layer norm); None: the whole grid. Images of one size are stacked (``grid_hw`` None); of different
    sizes, padded with zeros to the largest grid, ``grid_hw`` then holds each image's own (h'_i, w'_i).
    """
    sizes = [tuple(p.shape[-2:]) for p in mask_probs]
    valid = valid_grid or sizes
    rows, cols = [v[0] for v in valid], [v[1] for v in valid]
    if len(set(sizes)) == 1:
        return torch.stack(mask_probs), normalise_text_space(torch.stack(text_proj), rows, cols), None
    hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    probs = mask_probs[0].new_zeros(len(sizes), mask_probs[0].shape[0], hmax, wmax)
    semantic = text_proj[0].new_zeros(len(sizes), hmax, wmax, text_proj[0].shape[-1])
    for i, (h, w) in enumerate(sizes):
        probs[i, :, :h, :w] = mask_probs[i]
        semantic[i, :h, :w] = normalise_text_space(text_proj[i].unsqueeze(0), [rows[i]], [cols[i]])[0]
    return probs, semantic, [(int(h), int(w)) for h, w in sizes]


__all__ = ["ImageNetwork", "INPUT_NAMES", "OUTPUT_NAMES", "example_inputs", "finish_outputs", "network_inputs",
           "patch_grid"]
