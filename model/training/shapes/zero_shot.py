"""Zero-shot classification of shapes-world images with a CLIP, the tiny CLIP's yardstick.

Each single-object image is classified among all 64 concepts by cosine similarity between its CLIP image
embedding and the prompt embeddings (``"a {colour} {shape}"`` by default); accuracy is reported over all images
and separately for images of seen and unseen concepts. Evaluation images come from their own random streams,
never from the training stream.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import interpolate_pos_embed
from model.clip_weights import ClipTowers
from model.config import ModelConfig
from model.training.shapes.world import SHAPES, ShapesWorld, caption, prompt, render_scene

EVAL_STREAM, FINAL_EVAL_STREAM = 3, 4


def images_to_tensor(images: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 normalised with the config's mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def render_eval_set(world: ShapesWorld, size: int, per_concept: int, seed: int,
                    stream: int = EVAL_STREAM) -> tuple[np.ndarray, np.ndarray]:
    """Single-object images for zero-shot evaluation: (64 * per_concept, size, size, 3) uint8 and their concept
    ids (N,) int64, ``per_concept`` images of every concept."""
    images, labels = [], []
    for cid in world.split_ids("all"):
        for j in range(per_concept):
            scene = render_scene(np.random.default_rng([seed, stream, cid, j]), size, [cid], world)
            images.append(scene.image)
            labels.append(cid)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


@torch.no_grad()
def zero_shot_accuracy(towers: ClipTowers, tokenizer: Callable[[Sequence[str]], torch.Tensor], images: np.ndarray,
                       labels: np.ndarray, world: ShapesWorld, prompts: Sequence[str] | None = None,
                       batch_size: int = 256, interpolate_positions: bool = False) -> dict[str, float]:
    """Classify each image among all 64 concepts by cosine similarity to the prompt embeddings.

    ``prompts[i]`` describes concept ``i + 1`` (default ``"a {colour} {shape}"``). ``interpolate_positions``
    encodes images with ``encode_image_interpolated`` (any image size). Returns fractions in [0, 1]:
    ``acc`` (all images), ``acc_seen`` / ``acc_unseen`` (images of seen / unseen concepts, still classified
    among all 64), ``acc_colour`` / ``acc_shape`` (the predicted concept has the right colour / shape).
    """
    prompts = list(prompts or [prompt(n) for n in world.concepts])
    was_training = towers.visual.training, towers.text.training
    towers.visual.eval()
    towers.text.eval()
    text = F.normalize(towers.text(tokenizer(prompts)), dim=-1)
    preds = []
    for i in range(0, len(images), batch_size):
        x = images_to_tensor(images[i:i + batch_size], towers.config)
        emb = encode_image_interpolated(towers.visual, x) if interpolate_positions else towers.visual(x)
        preds.append((F.normalize(emb, dim=-1) @ text.t()).argmax(dim=1) + 1)
    towers.visual.train(was_training[0])
    towers.text.train(was_training[1])
    return accuracy_by_split(torch.cat(preds).numpy(), labels, world)


def encode_image_interpolated(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLIP image embedding (B, E) with the positional embedding re-interpolated to the input's grid the way
    ZUTIS does (``backbone.interpolate_pos_embed``), so any ``images`` (B, 3, H, W) size works. Class-token
    (``pool_type="tok"``) and patch-token mean (``"avg"``) pooling, as open_clip pools them."""
    return encode_image_and_tokens(visual, images)[0]


def encode_image_and_tokens(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One vision-tower pass giving both the pooled image embedding (B, E), as ``encode_image_interpolated``, and
    the projected patch tokens (B, h*w, E) (``ln_post`` then ``proj``, not normalised), the text-space view of
    each patch that ZUTIS's semantic branch reads. ``images``: (B, 3, H, W) normalised, any size."""
    x = visual.conv1(images)
    b, d, h, w = x.shape
    x = x.reshape(b, d, h * w).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, d).expand(b, 1, d).to(x.dtype), x], dim=1)
    x = visual.ln_pre(x + interpolate_pos_embed(visual.positional_embedding, h, w).to(x.dtype))
    x = visual.transformer(x)
    pool = getattr(visual, "pool_type", "tok")
    if getattr(visual, "final_ln_after_pool", False) or pool not in ("tok", "avg"):
        raise ValueError(f"unsupported vision pooling {pool!r} (final_ln_after_pool="
                         f"{getattr(visual, 'final_ln_after_pool', False)}); use 'tok' or 'avg'")
    x = visual.ln_post(x)  # open_clip's order: ln_post on every token, then pooling
    tokens = x[:, 1:]
    pooled = x[:, 0] if pool == "tok" else tokens.mean(dim=1)
    return pooled @ visual.proj, tokens @ visual.proj


def accuracy_by_split(predicted: np.ndarray, labels: np.ndarray, world: ShapesWorld) -> dict[str, float]:
    """Accuracies of predicted concept ids (N,) against true ids (N,); see ``zero_shot_accuracy``."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    correct = predicted == labels
    seen = np.isin(labels, world.seen_ids)
    n_shapes = len(SHAPES)
    return {
        "acc": float(correct.mean()),
        "acc_seen": float(correct[seen].mean()) if seen.any() else float("nan"),
        "acc_unseen": float(correct[~seen].mean()) if (~seen).any() else float("nan"),
        "acc_colour": float(((predicted - 1) // n_shapes == (labels - 1) // n_shapes).mean()),
        "acc_shape": float(((predicted - 1) % n_shapes == (labels - 1) % n_shapes).mean()),
    }


def final_metrics(towers: ClipTowers, tokenizer: Callable[[Sequence[str]], torch.Tensor], image_size: int,
                  per_concept: int, seed: int, world: ShapesWorld) -> dict[str, Any]:
    """Zero-shot accuracies on a fresh set of ``per_concept`` images per concept of side ``image_size``.

    Keys: those of ``accuracy_by_split`` with the ``"a {colour} {shape}"`` prompts; the same prefixed
    ``bare_name_`` with bare names ("red circle", how ZUTIS embeds categories); ``interpolated_pos_acc`` with
    positions re-interpolated as ZUTIS does; ``acc_at_<2S>px`` at twice the size; ``n_images``.
    """
    images, labels = render_eval_set(world, image_size, per_concept, seed, FINAL_EVAL_STREAM)
    final: dict[str, Any] = zero_shot_accuracy(towers, tokenizer, images, labels, world)
    bare = zero_shot_accuracy(towers, tokenizer, images, labels, world,
                              prompts=[caption([n], articles=False) for n in world.concepts])
    final.update({f"bare_name_{k}": v for k, v in bare.items()})
    interp = zero_shot_accuracy(towers, tokenizer, images, labels, world, interpolate_positions=True)
    final["interpolated_pos_acc"] = interp["acc"]
    big_images, big_labels = render_eval_set(world, 2 * image_size, max(1, per_concept // 2), seed,
                                             FINAL_EVAL_STREAM)
    big = zero_shot_accuracy(towers, tokenizer, big_images, big_labels, world, interpolate_positions=True)
    final[f"acc_at_{2 * image_size}px"] = big["acc"]
    final.update(text_separation(towers, tokenizer, world))
    final["n_images"] = int(len(labels))
    return final


@torch.no_grad()
def text_separation(towers: ClipTowers, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                    world: ShapesWorld) -> dict[str, Any]:
    """How far apart the text tower puts the 64 bare concept names (how ZUTIS embeds categories): the highest
    cosine between two different concepts (``text_max_cosine``, with the pair ``text_max_cosine_pair``) and the
    number of pairs above 0.9 (``text_pairs_above_0.9``)."""
    was_training = towers.text.training
    towers.text.eval()
    names = [caption([n], articles=False) for n in world.concepts]
    emb = F.normalize(towers.text(tokenizer(names)), dim=-1)
    towers.text.train(was_training)
    cos = emb @ emb.t()
    cos.fill_diagonal_(-1.0)
    i, j = divmod(int(cos.argmax()), len(names))
    return {"text_max_cosine": float(cos[i, j]), "text_max_cosine_pair": [names[i], names[j]],
            "text_pairs_above_0.9": int((cos > 0.9).sum()) // 2}
