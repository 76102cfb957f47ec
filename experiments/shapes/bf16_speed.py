"""bf16 autocast on CPU for the two shapes-world training commands: speed (and a short convergence check).

Speed: the CLIP pre-training step of a recipe (``model.training.shapes.clip_pretrain.train_step``, default the
shipped ``model/configs/shapes_clip.json``: batch 128 at 64 px, dense term on) and the ZUTIS training step of a
config (``model.train.training_step``, default ``model/configs/shapes.json``: batch 12 at 128 px), each in float32
and under bf16 autocast, **interleaved** (fp32, bf16, fp32, bf16, ... on the same weights' copies and the same
batches), so that the load of a shared CPU hits both alike; the ratio of medians is the figure to read. The CLIP
batches are the recipe's own rendered caption batches; the ZUTIS batches are random images with 1-6 random
rectangles per image as instances (the step's cost depends on shapes, not on content). ``--threads 2 1`` also
compares torch thread counts for the CLIP step (set before every step, the four variants interleaved): on a CPU
shared with other jobs one thread can beat two.

Convergence (``--converge-steps N``): two short CLIP runs of the recipe with ``steps`` N (its cosine schedule
over N), float32 and bf16, one after the other, and their loss and zero-shot curves.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python experiments/shapes/bf16_speed.py --rounds 20 --threads 2 1 --out bf16.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.reports import write_json_report  # noqa: E402


def clip_steps(recipe_path: Path, rounds: int, threads: Sequence[int]) -> dict[str, Any]:
    """Seconds per CLIP pre-training step, fp32 and bf16 at each of ``threads`` (torch threads, set before every
    step), all variants interleaved (``rounds`` rounds after one warm-up round; the order reverses every round)."""
    from model.training.shapes.clip_data import CachedTokenizer, caption_batches
    from model.training.shapes.clip_losses import concept_targets, content_groups
    from model.training.shapes.clip_pretrain import DenseTerm, build_clip, build_optimizer, train_step, tune_cpu
    from model.training.shapes.clip_recipe import ClipRecipe
    from model.training.shapes.world import ShapesWorld, caption
    from model.training.shapes.zero_shot import images_to_tensor

    recipe = dataclasses.replace(ClipRecipe.load(recipe_path), threads=threads[0])
    tune_cpu(threads[0])
    world, config = ShapesWorld(), recipe.model_config
    tokenizer = CachedTokenizer(config)
    concept_tokens = tokenizer([caption([n], articles=False) for n in world.concepts])
    variants = {_name(bf16, n, threads): (bf16, n) for n in threads for bf16 in (False, True)}
    runs = {}
    for name in variants:
        towers = build_clip(config, recipe.pos_init, recipe.seed)
        scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        dense_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        runs[name] = (towers, scale, dense_scale, build_optimizer(towers, scale, recipe, [dense_scale]))
    batches = caption_batches(recipe, world)
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    for i, (images, captions, contents) in enumerate(batches):
        if i > rounds:
            break
        x, tokens, groups = images_to_tensor(images, config), tokenizer(captions), content_groups(contents)
        for name in list(variants) if i % 2 == 0 else list(reversed(variants)):
            towers, scale, dense_scale, optimizer = runs[name]
            bf16, n = variants[name]
            dense = DenseTerm(concept_tokens, concept_targets(contents, world.num_concepts), dense_scale,
                              recipe.dense_weight, recipe.dense_tau) if recipe.dense_weight > 0 else None
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            loss = train_step(towers, scale, optimizer, x, tokens, groups, recipe.grad_clip, dense, bf16)
            if i > 0:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
                losses[name].append(loss)
    batches.close()
    torch.set_num_threads(threads[0])
    return _summary(times, losses, {"recipe": str(recipe_path), "batch_size": recipe.batch_size,
                                    "image_size": recipe.image_size, "dense": recipe.dense_weight > 0})


def _name(bf16: bool, threads: int, all_threads: Sequence[int]) -> str:
    """A variant's name: "fp32" / "bf16", with "@<threads>" when several thread counts are compared."""
    mode = "bf16" if bf16 else "fp32"
    return mode if len(all_threads) == 1 else f"{mode}@{threads}"


def zutis_steps(config_path: Path, rounds: int, threads: int, seed: int = 0) -> dict[str, Any]:
    """Seconds per ZUTIS training step, fp32 and bf16 interleaved, from the config's CLIP (heads random)."""
    from model.train import build_model, encode_vocabulary, training_step
    from model.training.config import load_config
    from model.training.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    cfg = load_config(config_path)
    if cfg.world is not None and cfg.world.clip_weights:
        cfg = dataclasses.replace(cfg, clip_weights=cfg.world.clip_weights)
    torch.manual_seed(seed)
    model, text = build_model(cfg)
    text_embeddings = encode_vocabulary(text, cfg)
    models = {"fp32": model, "bf16": copy.deepcopy(model)}
    optimizers = {m: build_optimizer(models[m], cfg.optim) for m in models}
    size, b = cfg.synthesis.crop_size, cfg.optim.batch_size
    gen = torch.Generator().manual_seed(seed)
    device = torch.device("cpu")
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(rounds + 1):
        batch = _random_batch(b, size, len(cfg.vocabulary), gen)
        for mode in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
            models[mode].train()
            t0 = time.perf_counter()
            _, loss = training_step(models[mode], models[mode], optimizers[mode], batch, text_embeddings, cfg,
                                    device, mode == "bf16")
            if i > 0:
                times[mode].append(time.perf_counter() - t0)
                losses[mode].append(float(loss.detach()))
    return _summary(times, losses, {"config": str(config_path), "batch_size": b, "crop_size": size})


def _random_batch(b: int, size: int, num_concepts: int, gen: torch.Generator) -> Any:
    """A ``TrainingBatch`` of random images with 1-6 random rectangles per image as instances."""
    from model.training.copy_paste import TrainingBatch

    images = torch.randn(b, 3, size, size, generator=gen)
    semantic = torch.zeros(b, size, size, dtype=torch.int64)
    masks, labels = [], []
    for j in range(b):
        k = int(torch.randint(1, 7, (1,), generator=gen))
        m = torch.zeros(k, size, size, dtype=torch.bool)
        lab = torch.randint(1, num_concepts + 1, (k,), generator=gen)
        for n in range(k):
            y, x = (int(v) for v in torch.randint(0, size - 16, (2,), generator=gen))
            h, w = (int(v) for v in torch.randint(8, size // 2, (2,), generator=gen))
            m[n, y:y + h, x:x + w] = True
            semantic[j][m[n]] = lab[n]
        masks.append(m)
        labels.append(lab)
    return TrainingBatch(images, semantic, masks, labels)


def _summary(times: dict[str, list[float]], losses: dict[str, list[float]], about: dict[str, Any]) -> dict[str, Any]:
    """Medians, steps/s and each variant's speed relative to the first (float32 at the first thread count)."""
    med = {m: statistics.median(t) for m, t in times.items()}
    first = next(iter(med))
    return {**about, "rounds": len(times[first]),
            "median_s_per_step": {m: round(v, 4) for m, v in med.items()},
            "steps_per_s": {m: round(1 / v, 3) for m, v in med.items()},
            f"speed_vs_{first}": {m: round(med[first] / v, 3) for m, v in med.items()},
            "s_per_step": {m: [round(v, 3) for v in t] for m, t in times.items()},
            "loss": {m: [round(v, 4) for v in t] for m, t in losses.items()}}


def converge(recipe_path: Path, steps: int, threads: int) -> dict[str, Any]:
    """Two short CLIP runs (fp32, then bf16) of the recipe with ``steps`` steps: their curves and final metrics."""
    from model.training.shapes.clip_pretrain import train_clip
    from model.training.shapes.clip_recipe import ClipRecipe

    out = {}
    for mode in ("fp32", "bf16"):
        recipe = dataclasses.replace(ClipRecipe.load(recipe_path), steps=steps, minutes=None, threads=threads,
                                     eval_every=max(1, steps // 6), cpu_amp=mode == "bf16")
        _, metrics = train_clip(recipe, log=lambda s: print(f"[{mode}] {s}", flush=True), progress=False)
        out[mode] = {k: metrics[k] for k in ("curve", "seconds", "train_seconds_per_step")}
        out[mode]["final"] = {k: v for k, v in metrics["final"].items() if isinstance(v, (int, float))}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip-recipe", type=Path, default=ROOT / "model" / "configs" / "shapes_clip.json")
    p.add_argument("--zutis-config", type=Path, default=ROOT / "model" / "configs" / "shapes.json")
    p.add_argument("--rounds", type=int, default=12, help="interleaved fp32/bf16 pairs per command")
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="torch threads; several values: the CLIP step is compared across them too, interleaved "
                        "(the ZUTIS step and the convergence runs use the first)")
    p.add_argument("--skip", choices=("clip", "zutis"), action="append", default=[])
    p.add_argument("--converge-steps", type=int, default=0, help="also two short CLIP runs of this many steps")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from model.dtypes import native_bf16_feature

    report: dict[str, Any] = {"cpu_native_bf16": native_bf16_feature() is not None, "threads": args.threads, "torch": torch.__version__,
                              "load_average_at_start": list(os.getloadavg())}
    if "clip" not in args.skip:
        report["clip_step"] = clip_steps(args.clip_recipe, args.rounds, args.threads)
        print(json.dumps({k: v for k, v in report["clip_step"].items() if k not in ("s_per_step", "loss")}),
              flush=True)
    if "zutis" not in args.skip:
        report["zutis_step"] = zutis_steps(args.zutis_config, args.rounds, args.threads[0])
        print(json.dumps({k: v for k, v in report["zutis_step"].items() if k not in ("s_per_step", "loss")}),
              flush=True)
    if args.converge_steps:
        report["converge"] = converge(args.clip_recipe, args.converge_steps, args.threads[0])
    if args.out:
        write_json_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
