"""The ZUTIS network (reference §1): CLIP ViT encoder, mask decoder, and the projection into text space.

The network returns tensors and knows nothing of concepts: text embeddings enter only in post-processing
(``model.postprocess``) and in the training loss, which is what lets requests with different vocabularies
share one batched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import build_vision_tower, encode_patch_tokens, encode_patch_tokens_ragged
from model.config import ModelConfig
from model.decoder import MLP, TransformerDecoder, sine_position_encoding


@dataclass
class ZUTISOutput:
    """What ``ZUTIS.forward`` returns.

    mask_probs: (B, Q, h', w') sigmoid mask probabilities of the last decoder layer.
    semantic_features: (B, h', w', E) per-pixel features in the CLIP text space, unit L2 norm per pixel.
    aux_mask_probs: (B, L-1, Q, h', w') the earlier decoder layers' masks (training mode only), else None.
    grid_hw: for a ragged batch (``ZUTIS.forward_ragged``), each image's own (h'_i, w'_i): its outputs are the
        top-left ``h'_i x w'_i`` of the padded grid (zeros elsewhere). None: every image uses the whole grid.
    """

    mask_probs: torch.Tensor
    semantic_features: torch.Tensor
    aux_mask_probs: torch.Tensor | None = None
    grid_hw: list[tuple[int, int]] | None = None

    def all_layer_mask_probs(self) -> torch.Tensor:
        """(B, L, Q, h', w'): every decoder layer's masks, last layer last (training mode only)."""
        if self.aux_mask_probs is None:
            return self.mask_probs.unsqueeze(1)
        return torch.cat([self.aux_mask_probs, self.mask_probs.unsqueeze(1)], dim=1)


class ZUTIS(nn.Module):
    """ZUTIS with the official parameter names (``query_embed``, ``encoder.*``, ``ffn1``, ``ffn2``, ``decoder``).

    ``forward(images, valid_hw=None)``:
    - ``images``: (B, 3, H, W) normalised with the config's mean/std; H, W need not be multiples of the patch size
      (trailing pixels are dropped, as in the official code).
    - ``valid_hw``: optional (B, 2) int tensor, the unpadded (height, width) in pixels of each letterboxed image
      (image at the top-left). The text-space layer-norm statistics (reference §1.9) are then computed over the
      valid token region only, so padding does not change an image's features. ``None`` = all valid (official).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.vision_width
        self.query_embed = nn.Parameter(torch.randn(config.num_queries, width))  # N(0,1), as nn.Embedding
        self.encoder = build_vision_tower(config)
        self.ffn1 = MLP(width, config.ffn_hidden_dim, width, 3)
        self.ffn2 = MLP(width, config.ffn_hidden_dim, width, 3)
        self.decoder = TransformerDecoder(width, config.decoder_heads, config.decoder_ffn_dim, config.decoder_layers)

    def forward(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> ZUTISOutput:
        tokens, h, w = encode_patch_tokens(self.encoder, images)  # (B, h*w, D)
        b, _, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, h, w)
        grid = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)  # (B, D, h', w')
        hp, wp = grid.shape[-2:]
        # contiguous: interpolate picks a different memory layout for B > 1, and GEMM results depend on layout
        up = grid.flatten(2).transpose(1, 2).contiguous()  # (B, h'w', D)

        # Mask branch: the encoder gets no gradient from it (stop-gradient, reference §1.1 step 4) unless the config
        # opts out; ``mask_position`` "sine" adds the positional encoding to the mask features (ModelConfig).
        pos = sine_position_encoding(1, d, hp, wp, images.device, up.dtype).flatten(2).permute(2, 0, 1)
        if self.training:
            mask_in = up.detach() if self.config.mask_stop_gradient else up
            probs = self._mask_probs(self._mask_features(mask_in, pos), pos, all_layers=True)
        else:
            # One image at a time: GEMMs pick kernels by matrix size, so running the mask branch per image keeps
            # every image's answer bitwise independent of how many images share its batch (the encoder's large
            # GEMMs and the text-space projection are batch-invariant as they are; tests/model/test_network.py).
            probs = torch.cat([self._mask_probs(self._mask_features(up[i:i + 1], pos), pos, all_layers=False)
                               for i in range(b)])
        probs = probs.reshape(b, probs.shape[1], probs.shape[2], hp, wp)

        semantic = self._text_space(up.reshape(b, hp, wp, d), images.shape[-2:], valid_hw)
        return ZUTISOutput(
            mask_probs=probs[:, -1],
            semantic_features=semantic,
            aux_mask_probs=probs[:, :-1] if self.training else None,
        )

    def _mask_features(self, up: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, N, D) upsampled tokens -> (B, N, D) mask features ``M``: ``ffn1(up)`` (official), plus the (N, 1, D)
        positional encoding ``pos`` when ``config.mask_position`` is "sine"."""
        features = self.ffn1(up)
        if self.config.mask_position == "sine":
            features = features + pos.transpose(0, 1).to(features.dtype)
        return features

    def forward_ragged(self, images: list[torch.Tensor]) -> ZUTISOutput:
        """Images of different sizes in one pass (inference only): each image's outputs equal its outputs alone.

        ``images``: ``B`` normalised tensors ``(3, H_i, W_i)`` (trailing pixels that do not fill a patch are
        dropped, as in the official code). The encoder runs on the padded batch with padding masked out of
        attention (``backbone.encode_patch_tokens_ragged``); the upsampling, the mask branch (decoder) and the
        text-space statistics run per image on its own grid. Returns outputs padded to the largest grid, with
        ``grid_hw`` set.
        """
        if self.training:
            raise RuntimeError("forward_ragged is for inference; train on fixed-size crops with forward()")
        tokens, grids = encode_patch_tokens_ragged(self.encoder, images)  # (B, N, D)
        b, _, d = tokens.shape
        out_grids = [(2 * h, 2 * w) for h, w in grids]
        hmax, wmax = max(g[0] for g in out_grids), max(g[1] for g in out_grids)
        probs = tokens.new_zeros(b, self.config.num_queries, hmax, wmax)
        semantic = tokens.new_zeros(b, hmax, wmax, self.encoder.proj.shape[1], dtype=torch.float32)
        for i, (h, w) in enumerate(grids):
            grid = tokens[i:i + 1, : h * w].transpose(1, 2).reshape(1, d, h, w)
            grid = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)  # (1, D, h', w')
            hp, wp = grid.shape[-2:]
            up = grid.flatten(2).transpose(1, 2).contiguous()  # (1, h'w', D)
            pos = sine_position_encoding(1, d, hp, wp, up.device, up.dtype).flatten(2).permute(2, 0, 1)
            features = self._mask_features(up, pos)
            probs[i, :, :hp, :wp] = self._mask_probs(features, pos, all_layers=False).reshape(-1, hp, wp)
            semantic[i, :hp, :wp] = self._text_space(up.reshape(1, hp, wp, d), torch.Size((hp, wp)), None)[0]
        return ZUTISOutput(mask_probs=probs, semantic_features=semantic, grid_hw=out_grids)

    def _mask_probs(self, pixel_embed: torch.Tensor, pos: torch.Tensor, all_layers: bool) -> torch.Tensor:
        """(B, N, D) pixel embeddings -> (B, L or 1, Q, N) mask probabilities; ``pos`` is (N, 1, D)."""
        b = pixel_embed.shape[0]
        query_pos = self.query_embed.to(pixel_embed.dtype).unsqueeze(1).expand(-1, b, -1)
        decoded = self.decoder(torch.zeros_like(query_pos), pixel_embed.transpose(0, 1), pos.expand(-1, b, -1),
                               query_pos)  # (L, Q, B, D)
        decoded = decoded.permute(2, 0, 1, 3)  # (B, L, Q, D)
        if not all_layers:
            decoded = decoded[:, -1:]
        mask_embed = self.ffn2(decoded)
        mask_embed = mask_embed / mask_embed.norm(dim=-1, keepdim=True)  # no epsilon, as the official code
        return torch.einsum("blqd,bnd->blqn", mask_embed, pixel_embed).sigmoid()

    def _text_space(self, up: torch.Tensor, input_hw: torch.Size, valid_hw: torch.Tensor | None) -> torch.Tensor:
        """(B, h', w', D) upsampled tokens -> (B, h', w', E) unit-norm text-space features (reference §1.9).

        The official code layer-normalises over (h', w', E) jointly, per image, without affine. Here the mean and
        variance come from the valid (unpadded) region of each image, computed one image at a time: a reduction
        over a whole batch splits across threads differently for different batch sizes.
        """
        proj = torch.einsum("bhwn,nc->bhwc", up, self.encoder.proj.to(up.dtype))
        b, hp, wp, _ = proj.shape
        rows, cols = valid_grid_size(valid_hw, input_hw, hp, wp, b)
        return normalise_text_space(proj, rows, cols)


def normalise_text_space(proj: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """(B, h', w', E) projected features -> (B, h', w', E) float32 unit-norm text-space features (reference §1.9).

    Per image, layer norm over (h', w', E) jointly without affine, its statistics from the top-left
    ``rows[i] x cols[i]`` valid region; then unit L2 norm per pixel. Computed in at least float32 (reduced-precision
    statistics over ~2.5 M values would move every feature; float32 and float64 inputs are used as they are).
    """
    proj = proj.to(torch.promote_types(proj.dtype, torch.float32))
    normed = torch.empty_like(proj)
    for i in range(proj.shape[0]):
        var, mean = torch.var_mean(proj[i, : rows[i], : cols[i]], unbiased=False)
        normed[i] = (proj[i] - mean) / torch.sqrt(var + 1e-5)
    return normed / (normed.norm(dim=-1, keepdim=True) + 1e-7)


def valid_grid_size(valid_hw: torch.Tensor | None, input_hw: torch.Size, hp: int, wp: int,
                    batch: int) -> tuple[list[int], list[int]]:
    """Rows and columns of the (h', w') grid covering each image's valid region (top-left letterbox).

    ``valid_hw``: (B, 2) unpadded height/width in input pixels, or None (everything valid).
    A row counts when it overlaps the valid region: ``ceil(valid_h / H_in * h')``, at least 1.
    """
    if valid_hw is None:
        return [hp] * batch, [wp] * batch
    vh = valid_hw.detach().to("cpu", torch.float64)
    rows = torch.ceil(vh[:, 0] / input_hw[0] * hp - 1e-9).clamp(1, hp).long().tolist()
    cols = torch.ceil(vh[:, 1] / input_hw[1] * wp - 1e-9).clamp(1, wp).long().tolist()
    return rows, cols
