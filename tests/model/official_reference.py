"""An independent, deliberately plain re-implementation of what the official ZUTIS code computes.

Written from the specification (shared/docs/zutis-reference.md §1.1-1.10, §2, §3.2-3.5) and imports nothing from
our ``model`` package: plain torch, ``nn.MultiheadAttention`` in sequence-first layout loaded with the packed
``in_proj_*`` weights, explicit positional-embedding interpolation, an explicit post-norm decoder, explicit MLPs,
the text-space projection with ``F.layer_norm`` over ``(h', w', E)``, semantic argmax, instance scoring and the
plain greedy NMS loop. It works on raw official-format state dicts (the 275-key layout for ViT-B) of any size, so
tests can compare our network against it on tiny random weights.

Nothing here is fast; everything here is meant to be read next to the specification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------------
# State-dict layout (§1.10)
# --------------------------------------------------------------------------------------------------------------

_BLOCK_SUFFIXES = (
    ("attn.in_proj_weight", lambda d, f, e: (3 * d, d)),
    ("attn.in_proj_bias", lambda d, f, e: (3 * d,)),
    ("attn.out_proj.weight", lambda d, f, e: (d, d)),
    ("attn.out_proj.bias", lambda d, f, e: (d,)),
    ("ln_1.weight", lambda d, f, e: (d,)),
    ("ln_1.bias", lambda d, f, e: (d,)),
    ("mlp.c_fc.weight", lambda d, f, e: (4 * d, d)),
    ("mlp.c_fc.bias", lambda d, f, e: (4 * d,)),
    ("mlp.c_proj.weight", lambda d, f, e: (d, 4 * d)),
    ("mlp.c_proj.bias", lambda d, f, e: (d,)),
    ("ln_2.weight", lambda d, f, e: (d,)),
    ("ln_2.bias", lambda d, f, e: (d,)),
)


def official_state_dict_shapes(width: int, layers: int, patch: int, grid: int, embed_dim: int, num_queries: int,
                               dec_layers: int, dec_ffn: int, ffn_hidden: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official ZUTIS ``state_dict``, in the official iteration order (§1.10).

    ``grid`` is the side of the CLIP positional-embedding grid (14 for ViT-B/16 at 224 px, 7 for ViT-B/32).
    For ViT-B/16 sizes this has 275 keys.
    """
    d = width
    shapes: dict[str, tuple[int, ...]] = {"query_embed": (num_queries, d)}
    shapes["encoder.class_embedding"] = (d,)
    shapes["encoder.positional_embedding"] = (grid * grid + 1, d)
    shapes["encoder.proj"] = (d, embed_dim)
    shapes["encoder.conv1.weight"] = (d, 3, patch, patch)
    shapes["encoder.ln_pre.weight"] = (d,)
    shapes["encoder.ln_pre.bias"] = (d,)
    for i in range(layers):
        for suffix, shape in _BLOCK_SUFFIXES:
            shapes[f"encoder.transformer.resblocks.{i}.{suffix}"] = shape(d, None, None)
    shapes["encoder.ln_post.weight"] = (d,)
    shapes["encoder.ln_post.bias"] = (d,)
    for ffn in ("ffn1", "ffn2"):
        dims = [d, ffn_hidden, ffn_hidden, d]
        for j in range(3):
            shapes[f"{ffn}.layers.{j}.weight"] = (dims[j + 1], dims[j])
            shapes[f"{ffn}.layers.{j}.bias"] = (dims[j + 1],)
    for i in range(dec_layers):
        p = f"decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            shapes[p + f"{attn}.in_proj_weight"] = (3 * d, d)
            shapes[p + f"{attn}.in_proj_bias"] = (3 * d,)
            shapes[p + f"{attn}.out_proj.weight"] = (d, d)
            shapes[p + f"{attn}.out_proj.bias"] = (d,)
        shapes[p + "linear1.weight"] = (dec_ffn, d)
        shapes[p + "linear1.bias"] = (dec_ffn,)
        shapes[p + "linear2.weight"] = (d, dec_ffn)
        shapes[p + "linear2.bias"] = (d,)
        for n in ("norm1", "norm2", "norm3"):
            shapes[p + f"{n}.weight"] = (d,)
            shapes[p + f"{n}.bias"] = (d,)
    shapes["decoder.norm.weight"] = (d,)
    shapes["decoder.norm.bias"] = (d,)
    return shapes


def random_official_state_dict(width: int, layers: int, heads: int, patch: int, grid: int, embed_dim: int,
                               num_queries: int, dec_layers: int, dec_heads: int, dec_ffn: int, ffn_hidden: int,
                               seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A random fp32 state dict with the official key names, order and shapes.

    Scales are chosen so the outputs are not degenerate (mask probabilities spread over (0, 1), LayerNorm
    affine parameters near 1/0). ``device="meta"`` gives shapes only (for counting ViT-B parameters cheaply).
    """
    if width % heads or width % dec_heads:
        raise ValueError(f"width {width} must be divisible by heads {heads} and dec_heads {dec_heads}")
    shapes = official_state_dict_shapes(width, layers, patch, grid, embed_dim, num_queries, dec_layers, dec_ffn,
                                        ffn_hidden)
    if torch.device(device).type == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        if key == "query_embed":
            t = randn(*shape)
        elif key in ("encoder.class_embedding", "encoder.positional_embedding", "encoder.proj"):
            t = randn(*shape) * width ** -0.5
        elif key == "encoder.conv1.weight":
            t = randn(*shape) * (3 * patch * patch) ** -0.5
        elif ".ln_" in key or ".norm" in key:  # LayerNorm affine
            t = 1.0 + 0.1 * randn(*shape) if leaf == "weight" else 0.1 * randn(*shape)
        elif key.startswith("ffn") and leaf == "weight":  # large pixel embeddings: confident, varied masks
            t = randn(*shape) * 3.0 * shape[1] ** -0.5
        elif leaf in ("weight", "in_proj_weight"):
            t = randn(*shape) * shape[1] ** -0.5
        else:  # biases
            t = 0.05 * randn(*shape)
        state[key] = t.contiguous().to(device)
    return state


def random_openai_clip_state_dict(embed_dim: int, vision_width: int, vision_layers: int, patch: int, grid: int,
                                  text_width: int, text_layers: int, context_length: int, vocab_size: int = 49408,
                                  seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A random CLIP ViT state dict with the key names of OpenAI's released files (``visual.*`` for the image
    tower; ``token_embedding``, ``positional_embedding``, ``transformer.*``, ``ln_final``, ``text_projection``,
    ``logit_scale`` and the three integer entries at the top level for the text tower), stored in ``dtype``
    (OpenAI's files are fp16)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def blocks(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(layers):
            for suffix, shape_fn in _BLOCK_SUFFIXES:
                shape = shape_fn(width, None, None)
                if "ln_" in suffix:
                    t = 1.0 + 0.1 * randn(*shape) if suffix.endswith("weight") else 0.1 * randn(*shape)
                elif suffix.endswith("weight"):
                    t = randn(*shape, scale=shape[1] ** -0.5)
                else:
                    t = 0.05 * randn(*shape)
                out[f"{prefix}resblocks.{i}.{suffix}"] = t
        return out

    vw, tw = vision_width, text_width
    state = {
        "visual.class_embedding": randn(vw, scale=vw ** -0.5),
        "visual.positional_embedding": randn(grid * grid + 1, vw, scale=vw ** -0.5),
        "visual.proj": randn(vw, embed_dim, scale=vw ** -0.5),
        "visual.conv1.weight": randn(vw, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        "visual.ln_pre.weight": 1.0 + 0.1 * randn(vw), "visual.ln_pre.bias": 0.1 * randn(vw),
        **blocks("visual.transformer.", vw, vision_layers),
        "visual.ln_post.weight": 1.0 + 0.1 * randn(vw), "visual.ln_post.bias": 0.1 * randn(vw),
        "positional_embedding": randn(context_length, tw, scale=0.1),
        "text_projection": randn(tw, embed_dim, scale=tw ** -0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "token_embedding.weight": randn(vocab_size, tw, scale=0.5),
        **blocks("transformer.", tw, text_layers),
        "ln_final.weight": 1.0 + 0.1 * randn(tw), "ln_final.bias": 0.1 * randn(tw),
    }
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    state.update({"input_resolution": torch.tensor(grid * patch), "context_length": torch.tensor(context_length),
                  "vocab_size": torch.tensor(vocab_size)})
    return state


def count_parameters(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


# --------------------------------------------------------------------------------------------------------------
# Forward (§1.1-1.9)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTSpec:
    """The CLIP ViT the official encoder was built from (not recoverable from shapes alone: ``heads``)."""

    width: int
    layers: int
    heads: int
    patch: int


# The tiny layouts the tests build from (sizes of model.config.tiny_test_config()): ViT width 48, 2 layers, 3 heads,
# patch 8, 8x8 grid, E = 32; 10 queries, 2 decoder layers with 2 heads, FFN 64, head MLP hidden 32; text width 32,
# 1 layer, context 16.
TINY = dict(width=48, layers=2, heads=3, patch=8, grid=8, embed_dim=32, num_queries=10, dec_layers=2, dec_heads=2,
            dec_ffn=64, ffn_hidden=32)
TINY_VIT = ViTSpec(width=48, layers=2, heads=3, patch=8)
TINY_CLIP = dict(embed_dim=32, vision_width=48, vision_layers=2, patch=8, grid=8, text_width=32, text_layers=1,
                 context_length=16)


def _layer_norm(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), state[prefix + ".weight"], state[prefix + ".bias"], eps=1e-5)


def _mha(state: dict[str, torch.Tensor], prefix: str, width: int, heads: int) -> nn.MultiheadAttention:
    """A sequence-first ``nn.MultiheadAttention`` holding the packed official weights under ``prefix``."""
    attn = nn.MultiheadAttention(width, heads, dropout=0.0, dtype=state[f"{prefix}.in_proj_weight"].dtype)
    attn.load_state_dict({k: state[f"{prefix}.{k}"] for k in
                          ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
    return attn.eval()


def _linear(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return x @ state[prefix + ".weight"].t() + state[prefix + ".bias"]


def _mlp3(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """DETR's 3-layer MLP: Linear, ReLU, Linear, ReLU, Linear (§1.4)."""
    x = torch.relu(_linear(x, state, f"{prefix}.layers.0"))
    x = torch.relu(_linear(x, state, f"{prefix}.layers.1"))
    return _linear(x, state, f"{prefix}.layers.2")


def interpolate_positional_embedding(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(1 + g*g, D) -> (1 + h*w, D): bicubic with ``scale_factor=((h+0.1)/g, (w+0.1)/g)``, CLS row untouched."""
    g = int(math.sqrt(pos.shape[0] - 1))
    d = pos.shape[1]
    grid = pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == (h, w), grid.shape
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, d)
    return torch.cat([pos[:1], grid], dim=0)


def encode_image(state: dict[str, torch.Tensor], vit: ViTSpec, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The modified CLIP ViT (§1.2). ``images`` (B,3,H,W) -> (tokens (B, h*w, D) after ln_post, no CLS, h, w)."""
    x = F.conv2d(images, state["encoder.conv1.weight"], stride=vit.patch)  # remainder pixels dropped
    b, d, h, w = x.shape
    x = x.reshape(b, d, h * w).permute(0, 2, 1)
    cls = state["encoder.class_embedding"].reshape(1, 1, d).expand(b, 1, d)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_positional_embedding(state["encoder.positional_embedding"], h, w)[None]
    x = _layer_norm(x, state, "encoder.ln_pre")
    x = x.permute(1, 0, 2)  # (1 + hw, B, D), sequence-first as in CLIP
    for i in range(vit.layers):
        p = f"encoder.transformer.resblocks.{i}"
        y = _layer_norm(x, state, p + ".ln_1")
        x = x + _mha(state, p + ".attn", d, vit.heads)(y, y, y, need_weights=False)[0]
        y = _layer_norm(x, state, p + ".ln_2")
        y = _linear(y, state, p + ".mlp.c_fc")
        y = y * torch.sigmoid(1.702 * y)  # QuickGELU
        x = x + _linear(y, state, p + ".mlp.c_proj")
    x = x.permute(1, 0, 2)[:, 1:]
    return _layer_norm(x, state, "encoder.ln_post"), h, w


def sine_positional_encoding(b: int, d: int, h: int, w: int) -> torch.Tensor:
    """DETR's normalised sine encoding on an all-valid (h, w) grid (§1.5) -> (B, d, h, w); first d/2 channels y."""
    npf = d // 2
    y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w)
    y = y / (h + 1e-6) * 2 * math.pi
    x = x / (w + 1e-6) * 2 * math.pi
    k = torch.arange(npf, dtype=torch.float32)
    dim_t = 10000.0 ** (2 * torch.div(k, 2, rounding_mode="floor") / npf)
    channels = []
    for coord in (y, x):
        v = coord[..., None] / dim_t  # (h, w, npf)
        out = torch.empty_like(v)
        out[..., 0::2] = v[..., 0::2].sin()
        out[..., 1::2] = v[..., 1::2].cos()
        channels.append(out)
    pos = torch.cat(channels, dim=-1).permute(2, 0, 1)  # (d, h, w)
    return pos[None].expand(b, d, h, w)


def decode(state: dict[str, torch.Tensor], memory: torch.Tensor, pos: torch.Tensor, dec_heads: int) -> torch.Tensor:
    """The post-norm DETR decoder (§1.6). ``memory``, ``pos``: (HW, B, D). Returns every layer: (L, Q, B, D)."""
    queries = state["query_embed"]
    q_count, d = queries.shape
    b = memory.shape[1]
    query_pos = queries[:, None, :].repeat(1, b, 1)
    tgt = torch.zeros_like(query_pos)
    n_layers = len({k.split(".")[2] for k in state if k.startswith("decoder.layers.")})
    outputs = []
    for i in range(n_layers):
        p = f"decoder.layers.{i}"
        q = tgt + query_pos
        tgt = _layer_norm(tgt + _mha(state, p + ".self_attn", d, dec_heads)(q, q, tgt)[0], state, p + ".norm1")
        attended = _mha(state, p + ".multihead_attn", d, dec_heads)(tgt + query_pos, memory + pos, memory)[0]
        tgt = _layer_norm(tgt + attended, state, p + ".norm2")
        ff = _linear(torch.relu(_linear(tgt, state, p + ".linear1")), state, p + ".linear2")
        tgt = _layer_norm(tgt + ff, state, p + ".norm3")
        outputs.append(_layer_norm(tgt, state, "decoder.norm"))  # one shared final norm for every layer
    return torch.stack(outputs)


def image_to_text_space(tokens_up: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """(§1.9) (B,h',w',D) -> (B,h',w',E): project, LayerNorm over (h',w',E) per image without affine, L2 + 1e-7."""
    u = torch.einsum("bhwn,nc->bhwc", tokens_up, proj)
    u = F.layer_norm(u, u.shape[1:], eps=1e-5)
    return u / (u.norm(dim=-1, keepdim=True) + 1e-7)


@torch.no_grad()
def official_forward(state: dict[str, torch.Tensor], vit: ViTSpec, images: torch.Tensor,
                     dec_heads: int = 8) -> dict[str, torch.Tensor]:
    """The official ``ZUTIS.forward`` (§1.1) in eval mode.

    ``images``: (B,3,H,W) fp32, ImageNet-normalised, unpadded. Returns ``mask_proposals`` (B,L,Q,h',w')
    probabilities for every decoder layer and ``patch_tokens`` (B,h',w',E) unit-norm text-space tokens.
    """
    tokens, h, w = encode_image(state, vit, images)
    b, _, d = tokens.shape
    up = F.interpolate(tokens.reshape(b, h, w, d).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear",
                       align_corners=False)
    h2, w2 = 2 * h, 2 * w
    up = up.permute(0, 2, 3, 1)  # (B, h', w', D)
    memory = _mlp3(up.reshape(b, h2 * w2, d), state, "ffn1")  # (B, h'w', D)
    pos = sine_positional_encoding(b, d, h2, w2).flatten(2).permute(2, 0, 1).to(memory.dtype)  # (h'w', B, D)
    hs = decode(state, memory.permute(1, 0, 2), pos, dec_heads).permute(2, 0, 1, 3)  # (B, L, Q, D)
    emb = _mlp3(hs, state, "ffn2")
    emb = emb / emb.norm(dim=-1, keepdim=True)  # no epsilon (§1.8)
    logits = torch.einsum("blqc,bhwc->blqhw", emb, memory.reshape(b, h2, w2, d))
    return {"mask_proposals": torch.sigmoid(logits),
            "patch_tokens": image_to_text_space(up, state["encoder.proj"])}


# --------------------------------------------------------------------------------------------------------------
# Preprocessing (§3.1, §3.6)
# --------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def official_preprocess(image: np.ndarray, max_size: int | None = None) -> torch.Tensor:
    """An (H, W, 3) uint8 RGB image -> (1, 3, h, w) network input, as the official loaders make it.

    COCO / CoCA: the image as it is. ImageNet-S (``max_size`` = 1024): only when the longer side exceeds
    ``max_size``, a PIL bilinear resize that makes the longer side ``max_size`` and the shorter one
    ``int(float(short) / long * max_size)``. Then ``to_tensor`` (/255) and the ImageNet mean/std. The output
    size of the predictions stays the original (H, W).
    """
    from PIL import Image

    pil = Image.fromarray(image, mode="RGB")
    width, height = pil.size
    if max_size is not None and max(height, width) > max_size:
        if width > height:
            new_wh = (max_size, int(float(height) / width * max_size))
        else:
            new_wh = (int(float(width) / height * max_size), max_size)
        pil = pil.resize(new_wh, Image.BILINEAR)
    x = torch.from_numpy(np.array(pil, dtype=np.float32)) / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(2, 0, 1)[None].contiguous()


# --------------------------------------------------------------------------------------------------------------
# Text embeddings (§2): OpenAI CLIP text tower, raw names, no templates
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_text(clip_state: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenAI CLIP ``encode_text`` on a raw OpenAI-format state dict, L2-normalised per row.

    ``tokens``: (N, context) int64 BPE ids with the EOT token holding the largest id. Returns (N, E) fp32.
    """
    x = clip_state["token_embedding.weight"].float()[tokens] + clip_state["positional_embedding"].float()
    n_ctx, width = x.shape[1], x.shape[2]
    mask = torch.full((n_ctx, n_ctx), float("-inf")).triu_(1)  # causal
    x = x.permute(1, 0, 2)
    layers = len({k.split(".")[2] for k in clip_state if k.startswith("transformer.resblocks.")})
    s = {k: v.float() for k, v in clip_state.items()}
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        y = _layer_norm(x, s, p + ".ln_1")
        x = x + _mha(s, p + ".attn", width, heads)(y, y, y, need_weights=False, attn_mask=mask)[0]
        y = _layer_norm(x, s, p + ".ln_2")
        y = _linear(y, s, p + ".mlp.c_fc")
        y = y * torch.sigmoid(1.702 * y)
        x = x + _linear(y, s, p + ".mlp.c_proj")
    x = _layer_norm(x.permute(1, 0, 2), s, "ln_final")
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ s["text_projection"]
    return x / x.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------------
# Inference (§3.2-3.5)
# --------------------------------------------------------------------------------------------------------------


def semantic_prediction(patch_tokens: torch.Tensor, text_embeddings: torch.Tensor,
                        size: tuple[int, int] | None) -> torch.Tensor:
    """(§3.2) cosine logits, bilinear to ``size`` (H, W), argmax over C. Returns (B, H, W) int64."""
    logits = torch.einsum("nc,bchw->bnhw", text_embeddings, patch_tokens.permute(0, 3, 1, 2))
    if size is not None:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / (np.logical_or(a, b).sum() + 1e-7))


def box_xyxy(mask: np.ndarray) -> list[float]:
    """Inclusive [x1, y1, x2, y2] of a non-empty bool mask (as torchvision ``masks_to_boxes``)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def hard_nms(masks: np.ndarray, scores: np.ndarray, categories: np.ndarray, iou_threshold: float = 0.3,
             score_floor: float = 0.001) -> list[tuple[int, int, float]]:
    """The official greedy loop (§3.4), hard mode, class-wise, background skipped.

    ``masks`` (N,H,W) bool full-resolution, ``scores`` (N,) float32, ``categories`` (N,). Returns the kept
    ``(query index, category, score)``, categories ascending then in selection order, empty masks dropped (the
    official code walks categories in ``set`` iteration order, which changes nothing but the output order).
    """
    kept: list[tuple[int, int, float]] = []
    for c in sorted(set(categories.tolist())):
        if c == 0:
            continue
        cand = [int(i) for i in np.nonzero(categories == c)[0]]
        cand_scores = [np.float32(scores[i]) for i in cand]
        while cand:
            order = np.argsort(np.asarray(cand_scores, dtype=np.float32))
            best = cand[order[-1]]
            kept.append((best, c, float(cand_scores[order[-1]])))
            next_cand, next_scores = [], []
            for j in order[:-1]:
                s = cand_scores[j] * np.float32(0 if mask_iou(masks[cand[j]], masks[best]) > iou_threshold else 1)
                if s > np.float32(score_floor):
                    next_cand.append(cand[j])
                    next_scores.append(s)
            cand, cand_scores = next_cand, next_scores
    return [(i, c, s) for i, c, s in kept if masks[i].any()]


@torch.no_grad()
def instance_prediction(mask_proposals: torch.Tensor, patch_tokens: torch.Tensor, text_embeddings: torch.Tensor,
                        size: tuple[int, int] | None, threshold: float = 0.5, temperature: float = 5.0,
                        nms_iou: float = 0.3, score_floor: float = 0.001,
                        id_map: dict[int, int] | None = None) -> list[list[dict]]:
    """(§3.3-3.5) ``mask_proposals`` (B,Q,h',w') or (B,L,Q,h',w'); returns one list of instance dicts per image.

    Each dict: ``query`` (index), ``label`` (contiguous id), ``category_id`` (through ``id_map`` if given),
    ``score``, ``mask`` (H,W bool numpy), ``image_size`` (H, W), ``bbox`` XYXY inclusive.
    """
    p = mask_proposals[:, -1] if mask_proposals.dim() == 5 else mask_proposals
    binary = p > threshold
    area = binary.sum(dim=(-2, -1))
    conf = (p * binary).sum(dim=(-2, -1)) / (area + 1e-7)
    mean_tok = (patch_tokens[:, None] * binary[..., None]).sum(dim=(-3, -2)) / (area[..., None] + 1e-7)
    mean_tok = mean_tok / (mean_tok.norm(dim=-1, keepdim=True) + 1e-7)
    probs = torch.sigmoid(torch.einsum("nc,bqc->bqn", text_embeddings, mean_tok) * temperature)
    labels = probs.argmax(dim=-1)
    scores = conf * probs.max(dim=-1).values
    if size is not None:
        full = F.interpolate(p, size=size, mode="bilinear", align_corners=False) > threshold
    else:
        full = binary
    results = []
    for b in range(p.shape[0]):
        masks = full[b].numpy()
        kept = hard_nms(masks, scores[b].numpy(), labels[b].numpy(), nms_iou, score_floor)
        results.append([{
            "query": q, "label": c, "category_id": id_map[c] if id_map is not None else c, "score": s,
            "mask": masks[q], "image_size": tuple(masks.shape[-2:]), "bbox": box_xyxy(masks[q]),
        } for q, c, s in kept])
    return results


def predict(outputs: dict[str, torch.Tensor], text_embeddings: torch.Tensor, size: tuple[int, int] | None,
            **instance_kwargs) -> dict[str, object]:
    """Both official inference paths on ``official_forward`` outputs: ``semantic`` (B,H,W) int64 and
    ``instances`` (list per image of dicts, see ``instance_prediction``)."""
    return {
        "semantic": semantic_prediction(outputs["patch_tokens"], text_embeddings, size),
        "instances": instance_prediction(outputs["mask_proposals"], outputs["patch_tokens"], text_embeddings,
                                         size, **instance_kwargs),
    }
