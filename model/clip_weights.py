"""Loading and saving plain CLIP weights (both towers), as used by retrieval, pseudo-masks and conversion.

Formats read:
- our own CLIP file: safetensors with keys ``visual.*`` / ``text.*`` and a ``model_config`` metadata entry;
- OpenAI's released CLIP files (TorchScript archives such as ``ViT-B-16.pt``), read with ``torch.jit.load``;
- a plain state dict (``.pt``/``.bin``) or open_clip checkpoint, read with ``torch.load(weights_only=True)``.
Nothing is ever unpickled and nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.backbone import build_text_tower, build_vision_tower
from model.config import ModelConfig

# OpenAI CLIP keys that belong to the text tower (everything not under ``visual.``).
_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_IGNORED = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size", "attn_mask")


@dataclass
class ClipTowers:
    """A CLIP model as two towers. ``visual``: open_clip VisionTransformer; ``text``: open_clip TextTransformer."""

    config: ModelConfig
    visual: nn.Module
    text: nn.Module


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as load_error:  # TorchScript archives (OpenAI's releases) are not pickles
        try:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:
            raise ValueError(f"{path}: neither a weights-only torch file nor a TorchScript archive "
                             f"({load_error})") from load_error
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def split_clip_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an OpenAI/open_clip CLIP state dict into (visual, text) dicts with tower-relative key names."""
    visual, text = {}, {}
    for k, v in state.items():
        if k.startswith("visual."):
            visual[k[len("visual."):]] = v
        elif k.startswith("text."):
            text[k[len("text."):]] = v
        elif k.startswith(_TEXT_TOP_LEVEL):
            text[k] = v
        elif k not in _IGNORED:
            raise ValueError(f"unexpected key in CLIP state dict: {k!r}")
    return visual, text


def load_clip(path: str | Path, config: ModelConfig | None = None) -> ClipTowers:
    """Build both CLIP towers and load ``path`` into them (strictly, fp32, eval mode).

    ``config`` is required for OpenAI/open_clip files; our own CLIP files carry it in their metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if config is None:
            if "model_config" not in meta:
                raise ValueError(f"{path}: no model_config in metadata; pass the architecture explicitly")
            config = ModelConfig.from_json(meta["model_config"])
    if config is None:
        raise ValueError(f"{path}: an architecture (ModelConfig) is needed to load this file")
    visual_sd, text_sd = split_clip_state_dict(read_state_dict(path))
    visual, text = build_vision_tower(config), build_text_tower(config)
    load_state_strict(visual, visual_sd, f"{path} (vision tower)")
    load_state_strict(text, text_sd, f"{path} (text tower)")
    return ClipTowers(config, visual.float().eval(), text.float().eval())


def save_clip(path: str | Path, towers: ClipTowers, extra_metadata: dict[str, str] | None = None) -> None:
    """Write both towers as one safetensors file (atomic: temporary file, then rename)."""
    tensors = {f"visual.{k}": v.detach().contiguous().cpu() for k, v in towers.visual.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().contiguous().cpu() for k, v in towers.text.state_dict().items()
                    if k != "attn_mask"})
    meta = {"format": "zutis-clip/1", "model_config": towers.config.to_json()}
    meta.update(extra_metadata or {})
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` after checking it holds exactly the module's keys with the module's shapes.

    Floating-point tensors are cast to float32 (files may store fp16); ``ValueError`` names ``what`` and lists
    the missing, unexpected and wrongly shaped keys.
    """
    expected = {k: v for k, v in module.state_dict().items() if k != "attn_mask"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or bad_shapes:
        raise ValueError(f"{what}: tensors do not match the architecture: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {bad_shapes[:5]}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
