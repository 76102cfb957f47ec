"""The mask decoder's parts, with the official parameter names (reference §1.4-1.6).

- ``MLP``: DETR-style ``layers.{0,1,2}`` Linear stack with ReLU between (none after the last).
- ``sine_position_encoding``: DETR/MaskFormer sine encoding, normalised, parameter-free.
- ``TransformerDecoder``: post-norm DETR decoder layers (``self_attn``, ``multihead_attn``, ``linear1/2``,
  ``norm1/2/3``) and one shared final ``norm`` applied to every layer's output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between: (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_position_encoding(batch: int, dim: int, h: int, w: int, device: torch.device,
                           dtype: torch.dtype = torch.float32, temperature: float = 10000.0) -> torch.Tensor:
    """DETR sine positional encoding of an all-valid ``h x w`` grid (reference §1.5).

    Returns (batch, dim, h, w): the first ``dim/2`` channels encode the row, the rest the column; positions
    1..h (1..w) are scaled to (0, 2pi]; channels interleave sin (even k) and cos (odd k).
    """
    if dim % 2:
        raise ValueError(f"sine position encoding needs an even dimension, got {dim}")
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32).view(h, 1).expand(h, w)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32).view(1, w).expand(h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    k = torch.arange(npf, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / npf)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t  # (h, w, npf)
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)  # (dim, h, w)
    return pos.unsqueeze(0).expand(batch, dim, h, w).to(dtype)


class TransformerDecoderLayer(nn.Module):
    """One post-norm DETR decoder layer, dropout 0, ReLU FFN. Tensors are sequence-first: (N, B, D)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt, need_weights=False)[0])
        attended = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory, need_weights=False)[0]
        tgt = self.norm2(tgt + attended)
        tgt = self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        return tgt


class TransformerDecoder(nn.Module):
    """``num_layers`` post-norm layers; returns every layer's output through the shared final norm.

    ``forward(tgt (Q,B,D), memory (N,B,D), pos (N,B,D), query_pos (Q,B,D)) -> (L, Q, B, D)``.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(d_model, nhead, dim_feedforward)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)
