"""Contrastive pre-training of a tiny open_clip CLIP on shapes-world caption pairs (this world's OpenAI CLIP).

Reads top to bottom: recipe, setup, data (rendered on the fly in a background thread), model, one loop with
periodic zero-shot evaluation, then the final evaluation and the weight file (``model.clip_weights.save_clip``:
safetensors with ``model_config``, ``recipe`` and ``metrics`` metadata).

    OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python -m model.shapes.clip_pretrain --config model/configs/shapes_clip.json --out runs/shapes/clip.safetensors

Choices worth knowing (shared/docs/shapes-notes.md has the prototype these follow):

- Images are normalised with the ModelConfig's ``image_mean``/``image_std``: ZUTIS normalises its input the same
  way, so the encoder it fine-tunes sees what the CLIP saw.
- The vision tower keeps open_clip's learnable ``positional_embedding`` (ZUTIS re-interpolates it on every call);
  ``pos_init="sincos"`` initialises it with 2-D sin-cos values, smooth in space, so that re-interpolation to
  other grids stays meaningful; ``"random"`` keeps open_clip's random init.
- Captions are listed objects under a few templates, bare names included ("red circle": ZUTIS embeds raw
  category names) and ``"background"`` for clutter-only images (ZUTIS's category 0).
- The dense patch-to-concept term (``dense_weight`` > 0, ``dense_concept_loss``; the shipped recipe uses it) asks
  that some projected patch token match each concept the caption names, with captions only, never masks: the
  contrastive loss alone teaches shape to the pooled embedding but hardly to the patch tokens that ZUTIS reads
  (docs/benchmarks.md, rung R1).
- Several images in a batch often show the same concepts. The loss treats every image/caption pair with the
  same content as a positive (uniform soft targets over them) instead of pushing identical captions apart.
- Determinism: step ``s`` renders from ``numpy.random.default_rng([seed, 0, s])``, the weights are initialised
  from ``torch.manual_seed(seed)``, so a run with ``steps`` set is reproducible on the same machine and thread
  count. With a ``minutes`` budget the step count is estimated from the measured speed (re-estimated every 25
  steps while the run is in its first half, so the cosine schedule may shift a little then) and recorded in the
  metadata; ``--steps`` gives a reproducible run.
- CPU speed traps: denormals are flushed (``torch.set_flush_denormal``) and glibc's malloc is told, via
  ``mallopt``, to keep large blocks mapped (the same as the MALLOC_* variables above, which you can set too).
  On a CPU shared with other busy processes, OpenMP's default spin-waiting made 2-thread steps ~5x slower
  (measured: 4.4-5.4 CPU-s and 10-28 s wall per step instead of 1.1 CPU-s and ~2 s); ``OMP_WAIT_POLICY=PASSIVE``
  (read when torch starts, so it must be set in the environment) removes that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import build_text_tower, build_tokenizer, build_vision_tower
from model.clip_weights import ClipTowers, save_clip
from model.config import ModelConfig, reject_unknown_keys
from model.training.runtime import tune_cpu_allocator
from model.training.shapes.world import ShapesWorld, caption, render_caption_batch
from model.training.shapes.zero_shot import (encode_image_and_tokens, final_metrics, images_to_tensor, render_eval_set,
                                    zero_shot_accuracy)

TRAIN_STREAM = 0
_ENV_HINTS = {"OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": "33554432",
              "MALLOC_TRIM_THRESHOLD_": "68719476736"}
_NO_DECAY = ("token_embedding", "positional_embedding", "class_embedding")


@dataclass(frozen=True)
class ClipRecipe:
    """Everything a pre-training run depends on. ``steps`` (if set) wins over ``minutes``.

    The image size is the vision tower's ``image_size``. ``objects_p[k]`` is the probability of ``k + 1`` objects
    in a non-empty image; ``empty_p`` that of a clutter-only image. ``train_split`` ("all" or "seen") restricts
    the concepts the CLIP ever sees (real CLIP saw everything; "seen" tests compositional generalisation).
    ``eval_every`` is in steps; evaluation uses ``eval_per_concept`` fresh single-object images per concept,
    the final one ``final_eval_per_concept``. ``dense_weight`` > 0 adds the dense patch-to-concept term
    (``dense_concept_loss``, soft maximum with temperature ``dense_tau``) with that weight; 0 is contrastive only.
    """

    model_config: ModelConfig
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    minutes: float | None = 10.0
    steps: int | None = None
    objects_p: tuple[float, ...] = (0.8, 0.12, 0.08)
    empty_p: float = 0.05
    train_split: str = "all"
    pos_init: str = "sincos"
    grad_clip: float | None = None
    dense_weight: float = 0.0
    dense_tau: float = 10.0
    eval_every: int = 100
    eval_per_concept: int = 8
    final_eval_per_concept: int = 16
    threads: int = 2
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.model_config, dict):
            object.__setattr__(self, "model_config", ModelConfig.from_dict(self.model_config))
        object.__setattr__(self, "objects_p", tuple(float(p) for p in self.objects_p))
        if self.steps is None and self.minutes is None:
            raise ValueError("ClipRecipe needs steps or minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        for name in ("batch_size", "eval_every", "eval_per_concept", "final_eval_per_concept", "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("a contrastive batch needs at least 2 images")
        if self.pos_init not in ("sincos", "random"):
            raise ValueError(f"pos_init must be 'sincos' or 'random', got {self.pos_init!r}")
        if self.train_split not in ("all", "seen"):
            raise ValueError(f"train_split must be 'all' or 'seen', got {self.train_split!r}")
        if not (self.dense_weight >= 0 and self.dense_tau > 0):
            raise ValueError(f"need dense_weight >= 0 and dense_tau > 0, got {self.dense_weight}, {self.dense_tau}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.warmup_steps >= 0):
            raise ValueError("need lr > 0, weight_decay >= 0 and warmup_steps >= 0")

    @property
    def image_size(self) -> int:
        size = self.model_config.open_clip_config()["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_config"] = self.model_config.to_dict()
        d["objects_p"] = list(self.objects_p)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipRecipe":
        reject_unknown_keys(d, cls, "ClipRecipe field(s)")
        if "model_config" not in d:
            raise ValueError("a ClipRecipe needs a model_config")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ClipRecipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP recipe not found: {path}")
        return cls.from_dict(json.loads(path.read_text()))


# -- pieces (pure functions; each tested) ------------------------------------------------------------------------

def build_clip(config: ModelConfig, pos_init: str = "sincos", seed: int = 0) -> ClipTowers:
    """Both towers, randomly initialised from ``seed``; with ``pos_init="sincos"`` the vision positional embedding
    (1 + g*g, width) starts as open_clip's 2-D sin-cos table (CLS row zero) and stays learnable."""
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    torch.manual_seed(seed)
    visual, text = build_vision_tower(config), build_text_tower(config)
    if pos_init == "sincos":
        grid = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
        table = get_2d_sincos_pos_embed(visual.positional_embedding.shape[1], grid, cls_token=True)
        with torch.no_grad():
            visual.positional_embedding.copy_(torch.from_numpy(table).float())
    elif pos_init != "random":
        raise ValueError(f"pos_init must be 'sincos' or 'random', got {pos_init!r}")
    return ClipTowers(config, visual, text)


def contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor,
                     group_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: pairs (i, j) with ``group_ids[i] == group_ids[j]`` are positives.

    ``image_embeddings``, ``text_embeddings``: (B, E) unit-norm. ``logit_scale``: scalar, log of the inverse
    temperature. ``group_ids``: (B,) int, equal for images of equal content. With all ids distinct this is
    CLIP's loss. Returns a scalar (mean over both directions).
    """
    logits = logit_scale.exp() * image_embeddings @ text_embeddings.t()
    same = (group_ids[:, None] == group_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def dense_concept_loss(tokens: torch.Tensor, concept_embeddings: torch.Tensor, targets: torch.Tensor,
                       logit_scale: torch.Tensor, tau: float = 10.0) -> torch.Tensor:
    """The dense patch-to-concept term: a multiple-instance loss that needs captions only, no masks.

    ``tokens``: (B, N, E) unit-norm projected patch tokens; ``concept_embeddings``: (K, E) unit-norm text
    embeddings of the K concept names; ``targets``: (B, K), each row uniform over the concepts visible in the
    image (rows of zeros, clutter-only images, are skipped); ``logit_scale``: scalar log inverse temperature.
    Each concept's score in an image is the soft maximum over patches of the patch-concept cosine,
    ``(logsumexp(tau * s) - log N) / tau``, so that some patch must match every named concept and no patch need
    match an absent one; softmax cross-entropy over the K concepts against ``targets``. Returns a scalar (0 when
    no row has a target).
    """
    n = tokens.shape[1]
    cosine = tokens @ concept_embeddings.t()  # (B, N, K)
    pooled = (torch.logsumexp(tau * cosine, dim=1) - math.log(n)) / tau  # (B, K)
    keep = targets.sum(dim=1) > 0
    if not bool(keep.any()):
        return pooled.sum() * 0.0
    log_p = F.log_softmax(logit_scale.exp() * pooled[keep], dim=1)
    return -(targets[keep] * log_p).sum(dim=1).mean()


def concept_targets(contents: Sequence[tuple[int, ...]], num_concepts: int) -> torch.Tensor:
    """(B, K) float: row b uniform over the concept ids (1..K) in ``contents[b]``, zeros for an empty image."""
    targets = torch.zeros(len(contents), num_concepts)
    for b, ids in enumerate(contents):
        if ids:
            targets[b, [i - 1 for i in set(ids)]] = 1.0 / len(set(ids))
    return targets


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak`` over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps``. ``step`` counts from 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class CachedTokenizer:
    """open_clip's tokenizer with a per-string cache (the shapes world has a few thousand distinct captions)."""

    def __init__(self, config: ModelConfig) -> None:
        self._tokenize = build_tokenizer(config)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, row in zip(missing, self._tokenize(missing)):
                self._cache[t] = row
        return torch.stack([self._cache[t] for t in texts])


# -- data --------------------------------------------------------------------------------------------------------

def caption_batches(recipe: ClipRecipe, world: ShapesWorld, start: int = 0,
                    prefetch: int = 3) -> Iterator[tuple[np.ndarray, list[str], list[tuple[int, ...]]]]:
    """Batches for steps ``start, start + 1, ...`` rendered by one background thread (deterministic per step)."""
    pool = world.split_ids(recipe.train_split)
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def work() -> None:
        step = start
        while not stop.is_set():
            rng = np.random.default_rng([recipe.seed, TRAIN_STREAM, step])
            item = render_caption_batch(rng, recipe.batch_size, recipe.image_size, pool, recipe.objects_p,
                                        recipe.empty_p, world)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    thread = threading.Thread(target=work, name="shapes-render", daemon=True)
    thread.start()
    try:
        while True:
            yield q.get()
    finally:
        stop.set()


def tune_cpu(threads: int) -> None:
    """Set the CPU knobs the prototype found essential: thread count, flushed denormals, glibc malloc thresholds."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    tune_cpu_allocator()


def content_groups(contents: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """(B,) int64 group ids, equal exactly for equal contents (e.g. the sorted concept ids in each image)."""
    index = {c: i for i, c in enumerate(dict.fromkeys(contents))}
    return torch.tensor([index[c] for c in contents], dtype=torch.int64)


def train_step(towers: ClipTowers, logit_scale: nn.Parameter, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, tokens: torch.Tensor, group_ids: torch.Tensor,
               grad_clip: float | None = None, dense: "DenseTerm | None" = None) -> float:
    """One optimisation step on a batch: images (B, 3, S, S) normalised, tokens (B, context) int64, group ids
    (B,). With ``dense`` the dense patch-to-concept term is added (``DenseTerm``). Logit scales are clamped to at
    most 100 afterwards, as in CLIP. Returns the loss."""
    if dense is None:
        image_emb = F.normalize(towers.visual(images), dim=-1)
    else:
        pooled, patch = encode_image_and_tokens(towers.visual, images)
        image_emb = F.normalize(pooled, dim=-1)
    text_emb = F.normalize(towers.text(tokens), dim=-1)
    loss = contrastive_loss(image_emb, text_emb, logit_scale, group_ids)
    if dense is not None:
        concepts = F.normalize(towers.text(dense.concept_tokens), dim=-1)
        loss = loss + dense.weight * dense_concept_loss(F.normalize(patch, dim=-1), concepts, dense.targets,
                                                        dense.logit_scale, dense.tau)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    with torch.no_grad():
        logit_scale.clamp_(0, math.log(100))
        if dense is not None:
            dense.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


@dataclass
class DenseTerm:
    """What the dense term needs at one step: the concept names' tokens (K, context), the batch's targets (B, K)
    (``concept_targets``), its own learnable logit scale, the weight and the soft-maximum temperature."""

    concept_tokens: torch.Tensor
    targets: torch.Tensor
    logit_scale: nn.Parameter
    weight: float
    tau: float


def build_optimizer(towers: ClipTowers, logit_scale: nn.Parameter, recipe: ClipRecipe,
                    extra_scales: Sequence[nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on embeddings, norms, biases or the logit scales)."""
    named = [(f"visual.{n}", p) for n, p in towers.visual.named_parameters() if p.requires_grad] + \
            [(f"text.{n}", p) for n, p in towers.text.named_parameters() if p.requires_grad]
    decays = {n: p.ndim >= 2 and not any(k in n for k in _NO_DECAY) for n, p in named}
    return torch.optim.AdamW([{"params": [p for n, p in named if decays[n]], "weight_decay": recipe.weight_decay},
                              {"params": [p for n, p in named if not decays[n]] + [logit_scale, *extra_scales],
                               "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)


# -- the run -----------------------------------------------------------------------------------------------------

def train_clip(recipe: ClipRecipe, log: Callable[[str], None] = print,
               progress: bool = True) -> tuple[ClipTowers, dict[str, Any]]:
    """Pre-train both towers per ``recipe``; returns the towers (eval mode) and the metrics dict
    (``curve``: one entry per evaluation; ``final``: accuracies on a fresh set, also with bare-name prompts;
    ``steps``, ``seconds``, ``train_seconds_per_step``)."""
    tune_cpu(recipe.threads)
    world = ShapesWorld()
    config = recipe.model_config
    towers = build_clip(config, recipe.pos_init, recipe.seed)
    tokenizer = CachedTokenizer(config)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    dense_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    use_dense = recipe.dense_weight > 0
    optimizer = build_optimizer(towers, logit_scale, recipe, [dense_scale] if use_dense else [])
    concept_tokens = tokenizer([caption([n], articles=False) for n in world.concepts])
    eval_images, eval_labels = render_eval_set(world, recipe.image_size, recipe.eval_per_concept, recipe.seed)

    budget_s = None if recipe.steps is not None else recipe.minutes * 60.0
    total = recipe.steps if recipe.steps is not None else max(recipe.warmup_steps + 1, 200)  # re-estimated below
    curve: list[dict[str, Any]] = []
    bar = _Progress(total, progress, log)
    start, eval_seconds, last_loss, estimated = time.perf_counter(), 0.0, float("nan"), False
    towers.visual.train()
    towers.text.train()
    batches = caption_batches(recipe, world)
    for step, (images, captions, contents) in enumerate(batches):
        if step >= total:
            break
        lr = learning_rate(step, total, recipe.lr, recipe.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        dense = DenseTerm(concept_tokens, concept_targets(contents, world.num_concepts), dense_scale,
                          recipe.dense_weight, recipe.dense_tau) if use_dense else None
        last_loss = train_step(towers, logit_scale, optimizer, images_to_tensor(images, config), tokenizer(captions),
                               content_groups(contents), recipe.grad_clip, dense)
        done = step + 1
        if budget_s is not None and done % 25 == 0 and (not estimated or done < total / 2):
            # wall-clock budget: (re-)estimate the step count from the speed so far, only in the run's first half
            elapsed = time.perf_counter() - start
            per_step = (elapsed - eval_seconds) / done
            total = max(done + 1, recipe.warmup_steps + 1, done + int((budget_s - elapsed) / per_step))
            estimated = True
        if done % recipe.eval_every == 0 or done == total:
            t0 = time.perf_counter()
            metrics = zero_shot_accuracy(towers, tokenizer, eval_images, eval_labels, world)
            eval_seconds += time.perf_counter() - t0
            entry = {"step": done, "seconds": round(time.perf_counter() - start, 1), "loss": round(last_loss, 4),
                     "logit_scale": round(float(logit_scale.detach().exp()), 2),
                     **{k: round(v, 4) for k, v in metrics.items()}}
            curve.append(entry)
            bar.write(_format_eval(entry))
        bar.update(done, total, last_loss, lr)
    batches.close()
    bar.close()
    seconds = time.perf_counter() - start
    towers.visual.eval()
    towers.text.eval()
    final = final_metrics(towers, tokenizer, recipe.image_size, recipe.final_eval_per_concept, recipe.seed, world)
    log("final (fresh images): " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in final.items()))
    metrics = {"curve": curve, "final": final, "steps": total, "seconds": round(seconds, 1),
               "train_seconds_per_step": round((seconds - eval_seconds) / total, 4),
               "logit_scale": round(float(logit_scale.detach().exp()), 3)}
    return towers, metrics


def pretrain_clip(recipe: ClipRecipe | str | Path, out: str | Path, *, minutes: float | None = None,
                  steps: int | None = None, seed: int | None = None, log: Callable[[str], None] = print,
                  progress: bool = True) -> Path:
    """Pre-train a tiny CLIP and write it to ``out`` (safetensors via ``save_clip``); returns ``out``.

    ``recipe``: a ``ClipRecipe`` or the path of its JSON. ``minutes`` / ``steps`` / ``seed`` override the
    recipe's (``steps`` wins over ``minutes``). The file's metadata holds ``model_config``, ``recipe`` (as run,
    with the step count actually used) and ``metrics`` (JSON; see ``train_clip``).
    """
    if not isinstance(recipe, ClipRecipe):
        recipe = ClipRecipe.load(recipe)
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides.update(steps=steps, minutes=None)
    elif minutes is not None:
        overrides.update(minutes=minutes, steps=None)
    if seed is not None:
        overrides["seed"] = seed
    recipe = dataclasses.replace(recipe, **overrides)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    towers, metrics = train_clip(recipe, log=log, progress=progress)
    ran = dataclasses.replace(recipe, steps=metrics["steps"], minutes=None)
    meta = {"recipe": json.dumps(ran.to_dict(), sort_keys=True), "metrics": json.dumps(metrics, sort_keys=True),
            "torch_version": torch.__version__, "producer": "model.shapes.clip_pretrain"}
    save_clip(out, towers, extra_metadata=meta)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def _format_eval(e: dict[str, Any]) -> str:
    return (f"step {e['step']:5d}  {e['seconds']:7.1f}s  loss {e['loss']:.3f}  scale {e['logit_scale']:6.2f}  "
            f"zero-shot acc {e['acc']:.3f} (seen {e['acc_seen']:.3f}, unseen {e['acc_unseen']:.3f}; "
            f"colour {e['acc_colour']:.3f}, shape {e['acc_shape']:.3f})")


class _Progress:
    """A tqdm bar (with ETA) on a terminal; otherwise a plain ``log`` line every ``every_s`` seconds, so that log
    files stay readable."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None], every_s: float = 30.0) -> None:
        self.enabled, self.log, self.every_s = enabled, log, every_s
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, done: int, total: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            per_step = (self.last - self.start) / done
            eta = int(per_step * (total - done))
            self.log(f"step {done}/{total}  {per_step:.2f} s/step  ETA {eta // 60}:{eta % 60:02d}  "
                     f"loss {loss:.3f}  lr {lr:.1e}")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        self.log(line)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pre-train the shapes world's tiny CLIP.")
    parser.add_argument("--config", type=Path, required=True, help="recipe JSON (model/configs/shapes_clip.json)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock training budget (overrides recipe)")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    missing = [k for k in _ENV_HINTS if k not in os.environ]
    if missing:
        print("hint: set " + " ".join(f"{k}={_ENV_HINTS[k]}" for k in missing) + " before starting Python "
              "(see this module's docstring: CPU speed traps)", file=sys.stderr)
    pretrain_clip(args.config, args.out, minutes=args.minutes, steps=args.steps, seed=args.seed)
