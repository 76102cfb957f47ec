"""Contrastive pre-training of a tiny open_clip CLIP on shapes-world caption pairs (this world's OpenAI CLIP): the
towers, the optimisation step, the training loop and the command.

Reads top to bottom: the pieces (towers, learning-rate schedule, CPU knobs, one optimisation step, the optimiser),
then the run: one loop with periodic zero-shot evaluation, the final evaluation and the weight file
(``model.clip_weights.save_clip``: safetensors with ``model_config``, ``recipe`` and ``metrics`` metadata). The
recipe is ``clip_recipe.ClipRecipe``, the data stream (rendered on the fly in a background thread) ``clip_data``,
the losses ``clip_losses``.

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
- The loss (``clip_losses``, whose docstring says why): CLIP's contrastive loss with every image/caption pair of
  the same content as a positive, plus, with ``dense_weight`` > 0 (the shipped recipe), the dense
  patch-to-concept term ``dense_concept_loss``, which needs captions only, never masks.
- Determinism: step ``s`` renders from ``numpy.random.default_rng([seed, 0, s])`` (``clip_data``), the weights
  are initialised from ``torch.manual_seed(seed)``, so a run with ``steps`` set is reproducible on the same
  machine and thread count. With a ``minutes`` budget the step count is estimated from the measured speed
  (re-estimated every 25 steps while the run is in its first half, so the cosine schedule may shift a little
  then) and recorded in the metadata; ``--steps`` gives a reproducible run.
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.backbone import build_text_tower, build_vision_tower, interpolate_pos_embed
from model.checkpoint import file_sha256
from model.clip_weights import ClipTowers, load_state_strict, read_state_dict, save_clip, split_clip_state_dict
from model.config import ModelConfig
from model.dtypes import native_bf16_feature
from model.training.runtime import tune_cpu_allocator
from model.training.shapes.clip_data import CachedTokenizer, caption_batches
from model.training.shapes.clip_losses import concept_targets, content_groups, contrastive_loss, dense_concept_loss
from model.training.shapes.clip_recipe import ClipRecipe
from model.training.shapes.world import ShapesWorld, caption
from model.training.shapes.zero_shot import (encode_image_and_tokens, final_metrics, images_to_tensor, render_eval_set,
                                             zero_shot_accuracy)

_ENV_HINTS = {"OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": "33554432",
              "MALLOC_TRIM_THRESHOLD_": "68719476736"}
_NO_DECAY = ("token_embedding", "positional_embedding", "class_embedding")


# -- pieces (each tested) ----------------------------------------------------------------------------------------

def build_clip(config: ModelConfig, pos_init: str = "sincos", seed: int = 0) -> ClipTowers:
    """Both towers, randomly initialised from ``seed``; with ``pos_init="sincos"`` the vision positional embedding
    (1 + g*g, width) starts as open_clip's 2-D sin-cos table (CLS row zero) and stays learnable."""
    from open_clip.pos_embed import get_2d_sincos_pos_embed  # deferred: open_clip takes seconds to import

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


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak`` over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps``. ``step`` counts from 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def tune_cpu(threads: int) -> None:
    """Set the CPU knobs the prototype found essential: thread count, flushed denormals, glibc malloc thresholds."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    tune_cpu_allocator()


def train_step(towers: ClipTowers, logit_scale: nn.Parameter, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, tokens: torch.Tensor, group_ids: torch.Tensor,
               grad_clip: float | None = None, dense: "DenseTerm | None" = None, bf16: bool = False) -> float:
    """One optimisation step on a batch: images (B, 3, S, S) normalised, tokens (B, context) int64, group ids
    (B,). With ``dense`` the dense patch-to-concept term is added (``DenseTerm``). ``bf16``: the towers run under
    bfloat16 autocast on CPU, the losses in float32. Logit scales are clamped to at most 100 afterwards, as in
    CLIP. Returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if dense is None:
            pooled, patch = towers.visual(images), None
        else:
            pooled, patch = encode_image_and_tokens(towers.visual, images)
        text = towers.text(tokens)
        concepts = towers.text(dense.concept_tokens) if dense is not None else None
    image_emb = F.normalize(pooled.float(), dim=-1)
    text_emb = F.normalize(text.float(), dim=-1)
    loss = contrastive_loss(image_emb, text_emb, logit_scale, group_ids)
    if dense is not None:
        loss = loss + dense.weight * dense_concept_loss(F.normalize(patch.float(), dim=-1),
                                                        F.normalize(concepts.float(), dim=-1), dense.targets,
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


def load_initial_clip(towers: ClipTowers, path: str | Path) -> None:
    """Load a saved CLIP file (``save_clip``'s format) into freshly built ``towers`` of the same architecture; the
    vision tower's image size may differ: its positional embedding (1 + g*g, width) is then re-interpolated to the
    towers' grid (``model.backbone.interpolate_pos_embed``, as ZUTIS does on every call). Anything else that does
    not match raises ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_clip: CLIP file not found: {path}")
    visual_sd, text_sd = split_clip_state_dict(read_state_dict(path))
    want = towers.visual.positional_embedding
    have = visual_sd.get("positional_embedding")
    if have is not None and have.shape != want.shape and have.shape[1:] == want.shape[1:]:
        grid = int(round((want.shape[0] - 1) ** 0.5))
        visual_sd["positional_embedding"] = interpolate_pos_embed(have.float(), grid, grid)
    load_state_strict(towers.visual, visual_sd, f"init_clip {path} (vision tower)")
    load_state_strict(towers.text, text_sd, f"init_clip {path} (text tower)")


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
    if recipe.init_clip is not None:
        load_initial_clip(towers, recipe.init_clip)
        log(f"initialised from {recipe.init_clip}")
    if recipe.cpu_amp and native_bf16_feature() is None:
        log("warning: cpu_amp is set but this CPU has no native bf16 (AVX512-BF16 / AMX): autocast emulates it")
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
                               content_groups(contents), recipe.grad_clip, dense, recipe.cpu_amp)
        done = step + 1
        if budget_s is not None and done % 25 == 0 and (not estimated or done < total / 2):
            # wall-clock budget: (re-)estimate the step count from the speed so far, only in the run's first half
            total = _steps_in_budget(done, time.perf_counter() - start, eval_seconds, budget_s, recipe.warmup_steps)
            estimated = True
        if done % recipe.eval_every == 0 or done == total:
            t0 = time.perf_counter()
            metrics = zero_shot_accuracy(towers, tokenizer, eval_images, eval_labels, world)
            eval_seconds += time.perf_counter() - t0
            curve.append(_curve_entry(done, time.perf_counter() - start, last_loss, logit_scale, metrics))
            bar.write(_format_eval(curve[-1]))
        bar.update(done, total, last_loss, lr)
    batches.close()
    bar.close()
    seconds = time.perf_counter() - start
    towers.visual.eval()
    towers.text.eval()
    final = _final_evaluation(towers, tokenizer, recipe, world, log)
    metrics = {"curve": curve, "final": final, "steps": total, "seconds": round(seconds, 1),
               "train_seconds_per_step": round((seconds - eval_seconds) / total, 4),
               "logit_scale": round(float(logit_scale.detach().exp()), 3)}
    return towers, metrics


def _steps_in_budget(done: int, elapsed: float, eval_seconds: float, budget_s: float, warmup_steps: int) -> int:
    """The step count that fills ``budget_s`` seconds at the training speed of the ``done`` steps so far
    (evaluation time excluded); at least one more step and one past the warm-up."""
    per_step = (elapsed - eval_seconds) / done
    return max(done + 1, warmup_steps + 1, done + int((budget_s - elapsed) / per_step))


def _curve_entry(done: int, seconds: float, loss: float, logit_scale: nn.Parameter,
                 metrics: dict[str, float]) -> dict[str, Any]:
    """One point of the training curve: step, wall-clock seconds, loss, logit scale and zero-shot accuracies."""
    return {"step": done, "seconds": round(seconds, 1), "loss": round(loss, 4),
            "logit_scale": round(float(logit_scale.detach().exp()), 2), **{k: round(v, 4) for k, v in metrics.items()}}


def _final_evaluation(towers: ClipTowers, tokenizer: CachedTokenizer, recipe: ClipRecipe, world: ShapesWorld,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """``zero_shot.final_metrics`` on a fresh evaluation set of the recipe's size, logged on one line."""
    final = final_metrics(towers, tokenizer, recipe.image_size, recipe.final_eval_per_concept, recipe.seed, world)
    log("final (fresh images): " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in final.items()))
    return final


def pretrain_clip(recipe: ClipRecipe | str | Path, out: str | Path, *, minutes: float | None = None,
                  steps: int | None = None, seed: int | None = None, init_clip: str | None = None,
                  log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Pre-train a tiny CLIP and write it to ``out`` (safetensors via ``save_clip``); returns ``out``.

    ``recipe``: a ``ClipRecipe`` or the path of its JSON. ``minutes`` / ``steps`` / ``seed`` / ``init_clip``
    override the recipe's (``steps`` wins over ``minutes``). The file's metadata holds ``model_config``, ``recipe``
    (as run, with the step count actually used), ``metrics`` (JSON; see ``train_clip``) and, when it started from
    one, ``init_clip_sha256``.
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
    if init_clip is not None:
        overrides["init_clip"] = init_clip
    recipe = dataclasses.replace(recipe, **overrides)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    towers, metrics = train_clip(recipe, log=log, progress=progress)
    ran = dataclasses.replace(recipe, steps=metrics["steps"], minutes=None)
    meta = {"recipe": json.dumps(ran.to_dict(), sort_keys=True), "metrics": json.dumps(metrics, sort_keys=True),
            "torch_version": torch.__version__, "producer": "model.shapes.clip_pretrain"}
    if recipe.init_clip is not None:
        meta["init_clip_sha256"] = file_sha256(recipe.init_clip)
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
    """``python -m model.shapes.clip_pretrain --config RECIPE --out FILE.safetensors [--minutes|--steps] [--seed]``."""
    parser = argparse.ArgumentParser(description="Pre-train the shapes world's tiny CLIP.")
    parser.add_argument("--config", type=Path, required=True, help="recipe JSON (model/configs/shapes_clip.json)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock training budget (overrides recipe)")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this saved CLIP file (overrides the recipe's init_clip), e.g. a 128-px "
                             "phase after a 64-px run")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    missing = [k for k in _ENV_HINTS if k not in os.environ]
    if missing:
        print("hint: set " + " ".join(f"{k}={_ENV_HINTS[k]}" for k in missing) + " before starting Python "
              "(see this module's docstring: CPU speed traps)", file=sys.stderr)
    pretrain_clip(args.config, args.out, minutes=args.minutes, steps=args.steps, seed=args.seed,
                  init_clip=str(args.init) if args.init else None)
