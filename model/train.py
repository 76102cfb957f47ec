"""Train ZUTIS (reference §4): ``python -m model.train --config model/configs/X.json [--resume] [--out DIR]``.

Reads top to bottom: config -> setup -> world -> model -> data stages -> one loop (log, checkpoint) -> export.
The same script runs under ``torchrun`` (DDP, one process per GPU; only rank 0 writes). The pieces it calls live
in ``model.training``:

- Config (``model.training.config``): JSON -> dataclasses, every input checked before any work.
- World (optional ``world`` section, ``model.training.stages.WorldConfig``): a run from nothing first builds its
  images, held-out scenes and CLIP (the shapes world) as cached stages, which fill in ``clip_weights``,
  ``data.index_dirs``, ``eval`` and ``val``.
- Data stages (``model.training.stages``): image index -> top-n retrieval per concept -> pseudo-masks, each cached
  in a directory keyed by a content hash of its inputs, so a re-run (or ``--resume``) skips finished stages. A
  config may instead give a finished retrieval JSON, a pseudo-mask folder, or ground-truth masks (the "oracle").
- Resume: the training state (model, AdamW, step, RNGs) is written atomically every ``checkpoint_every`` steps.
  The learning rate and the data stream are pure functions of the step, so ``--resume`` continues exactly as an
  uninterrupted run (bitwise on CPU).
- Export (``model.training.export``): the service's checkpoint format (``model.checkpoint``, at ``export_path``)
  with provenance (command, git commit, date, data, config, stage timings); with a ``val`` set, the score
  threshold chosen on it (``model.training.operating_point``); with an ``eval`` set, its metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from model.checkpoint import load_checkpoint
from model.clip_weights import load_clip
from model.dtypes import native_bf16_feature
from model.network import ZUTIS
from model.text import TextEncoder
from model.training.config import TrainConfig, load_config, validate_inputs, with_oracle_scenes, with_world
from model.training.copy_paste import CopyPasteDataset, StepBatchSampler, collate_samples
from model.training.criterion import compute_losses
from model.training.export import export
from model.training.optim import build_optimizer, set_lr, total_loss
from model.training.runtime import Dist, git_commit, seed_everything, setup_distributed, tune_cpu_allocator
from model.training.stages import prepare_training_data, prepare_world
from model.training.state import load_training_state, save_training_state

Log = Callable[..., None]


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """ZUTIS with its encoder initialised from the CLIP weights (heads random) and the CLIP text tower."""
    model = ZUTIS(cfg.model)
    if cfg.init_checkpoint:
        loaded = load_checkpoint(cfg.init_checkpoint)
        model.encoder.load_state_dict(loaded.model.encoder.state_dict())
        return model, loaded.text_encoder.tower.float().eval().requires_grad_(False)
    towers = load_clip(cfg.clip_weights, cfg.model)
    model.encoder.load_state_dict(towers.visual.state_dict())
    text_tower = towers.text.eval().requires_grad_(False)
    return model, text_tower


@torch.no_grad()
def encode_vocabulary(text_tower: torch.nn.Module, cfg: TrainConfig) -> torch.Tensor:
    """Unit-norm (C, E) text embeddings of ``["background", *vocabulary]`` (raw names, reference §2)."""
    encoder = TextEncoder(cfg.model, text_tower)
    return encoder.encode(["background", *cfg.vocabulary]).float()


# Settings that may change between an interrupted run and its --resume without changing the result.
_RESUME_MAY_CHANGE = ("out_dir", "cache_dir", "num_workers", "log_every", "checkpoint_every", "cpu_amp", "eval", "val",
                      "description", "export_path", "export_dtype", "export_vocabulary", "inference")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    c = json.loads(json.dumps(config))
    for k in _RESUME_MAY_CHANGE:
        c.pop(k, None)
        c.get("optim", {}).pop(k, None)
    return c


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training config JSON (see model/configs/)")
    p.add_argument("--out", help="run directory (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    p.add_argument("--steps", type=int, help="override optim.steps (the schedule length)")
    p.add_argument("--stop-at", type=int, help="stop after this step, saving the training state, without exporting "
                                               "(for time-limited jobs; continue with --resume)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--stages-only", action="store_true", help="build the data stages, then exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """One training run, its phases in order: config, setup, world, model, data, the loop, export.

    Longer than the project's 60-line guide on purpose: like nanoGPT's ``train.py``, the run's order is read in one
    place, each phase a few lines that call ``model.training`` (the loop itself is ``train``)."""
    args = parse_args(argv)
    command = [sys.executable, "-m", "model.train", *(sys.argv[1:] if argv is None else argv)]

    # -- config: everything the run reads is checked here, before any work
    cfg = load_config(args.config, steps=args.steps)
    out_dir = Path(args.out or cfg.out_dir)
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "stages"
    if cfg.world is None:
        validate_inputs(cfg)  # a world's inputs exist only once its stages have run (below)
    state_path = out_dir / "train_state.pt"
    check_run_directory(state_path, args.resume, args.stop_at)

    # -- setup
    dist, device = setup_distributed(args.device)
    log = _logger(dist)
    torch.set_flush_denormal(True)  # denormals made CPU step times swing 10x (shapes-notes.md)
    if device.type == "cpu":
        tune_cpu_allocator()
    seed_everything(cfg.optim.seed)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log(f"rank {dist.rank}/{dist.world_size} on {device}; run directory {out_dir}")
    timings: dict[str, float] = {}
    clock = time.monotonic()

    # -- world: a run from nothing builds its images, held-out scenes and CLIP first (cached stages)
    if cfg.world is not None:
        if dist.world_size > 1:
            raise ValueError("a 'world' section builds its stages in one process: run it once without torchrun")
        cfg = with_world(cfg, prepare_world(cfg.world, cache_dir, log))
        if cfg.oracle_scenes is not None:
            cfg = with_oracle_scenes(cfg, cache_dir, log)
        validate_inputs(cfg)
        timings["world"], clock = round(time.monotonic() - clock, 1), time.monotonic()

    # -- model: built before the data stages, so a CLIP file that does not fit fails now, not hours later, and the
    # random head initialisation does not depend on whether the stages were cached
    model, text_tower = build_model(cfg)
    text_embeddings = encode_vocabulary(text_tower, cfg).to(device)

    # -- data
    data = prepare_training_data(cfg.data, cfg.vocabulary, cfg.clip_weights, cfg.model, cache_dir, device,
                                 is_main=dist.main, log=log)
    timings["data"], clock = round(time.monotonic() - clock, 1), time.monotonic()
    if args.stages_only:
        return 0
    dataset = CopyPasteDataset(data.retrieval, cfg.vocabulary, data.annotations, cfg.synthesis, cfg.optim.seed)
    log(f"{len(dataset)} retrieved entries ({data.provenance['images']} images), {len(cfg.vocabulary)} concepts")

    # -- optimiser (and the state of an interrupted run), then the loop
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    step = resume(state_path, model, optimizer, cfg, log) if args.resume else 0
    stop = min(cfg.optim.steps, args.stop_at) if args.stop_at else cfg.optim.steps
    step = train(model, optimizer, dataset, text_embeddings, cfg, step, stop, dist, device, log, state_path)
    timings["train"], clock = round(time.monotonic() - clock, 1), time.monotonic()
    if dist.world_size > 1:  # leave the group before exporting: a long evaluation must not hit a collective timeout
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    # -- export
    if step >= cfg.optim.steps and dist.main:
        provenance = {"command": command, "git": git_commit(), "cwd": os.getcwd(),
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data": data.provenance,
                      "config": cfg.to_dict(), "steps": step, "world_size": dist.world_size,
                      "timings_seconds": timings}
        path = Path(cfg.export_path) if cfg.export_path else out_dir / "model.safetensors"
        path = export(path, model, text_tower, cfg, provenance, device, log)
        log(f"exported {path}")
    return 0


def check_run_directory(state_path: Path, resume_run: bool, stop_at: int | None) -> None:
    """A new run must not overwrite a training state, and ``--resume`` needs one."""
    if resume_run and not state_path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {state_path}")
    if not resume_run and state_path.exists():
        raise FileExistsError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    if stop_at is not None and stop_at < 1:
        raise ValueError("--stop-at must be positive")


def resume(state_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
           log: Log) -> int:
    """Load an interrupted run's state into ``model`` and ``optimizer``; its step. Only the settings in
    ``_RESUME_MAY_CHANGE`` may differ from the config it was trained with."""
    step, extra = load_training_state(state_path, model, optimizer)
    if _comparable(extra.get("config", {})) != _comparable(cfg.to_dict()):
        raise ValueError(f"--resume: the config differs from the one {state_path} was trained with "
                         f"(only {', '.join(_RESUME_MAY_CHANGE)} may change)")
    log(f"resumed at step {step}")
    return step


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: CopyPasteDataset,
          text_embeddings: torch.Tensor, cfg: TrainConfig, step: int, stop: int, dist: Dist, device: torch.device,
          log: Log, state_path: Path) -> int:
    """The loop, from ``step`` to ``stop``: one copy-paste batch, the named losses (mask on every decoder layer's
    proposals, CE on ``ce_logit_scale`` x the cosine logits, reference §4.2), AdamW at the PolyLR rate; windowed
    loss means logged every ``log_every`` steps, the training state saved every ``checkpoint_every``. Returns
    the step reached."""
    o = cfg.optim
    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(o.batch_size, o.steps, step, dist.rank, dist.world_size),
        collate_fn=collate_samples, num_workers=o.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator())  # its own generator: the loader must not draw from the global RNG
    amp = (device.type == "cuda" and o.amp) or (device.type == "cpu" and o.cpu_amp)
    if device.type == "cpu" and o.cpu_amp and native_bf16_feature() is None:
        log("warning: optim.cpu_amp is set but this CPU has no native bf16 (AVX512-BF16 / AMX): autocast emulates it")
    bar = tqdm(total=stop, initial=step, disable=not (dist.main and sys.stderr.isatty()), unit="step")
    window = LossWindow(dist)
    batches = iter(loader)
    while step < stop:
        t0 = time.monotonic()
        batch = next(batches).to(device)
        window.data_seconds += time.monotonic() - t0
        lrs = set_lr(optimizer, step, o)
        losses, loss = training_step(train_model, model, optimizer, batch, text_embeddings, cfg, device, amp)
        step += 1
        bar.update(1)
        window.add({**losses, "total": loss})
        if step % o.log_every == 0 or step == stop:
            window.report(step, stop, o.steps, lrs, bar, log, Path(cfg.out_dir))
        if dist.main and (step % o.checkpoint_every == 0 or step == stop):
            save_training_state(state_path, model, optimizer, step, extra={"config": cfg.to_dict()})
    bar.close()
    return step


def training_step(train_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  batch: Any, text_embeddings: torch.Tensor, cfg: TrainConfig, device: torch.device,
                  amp: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step on a ``TrainingBatch`` already on ``device``: the forward pass (under bf16 autocast
    with ``amp``; the losses run in float32), the named losses and their weighted total, backward, gradient
    clipping, AdamW. ``train_model`` is ``model`` or its DDP wrapper. Returns (named losses, total)."""
    o = cfg.optim
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = train_model(batch.images)
    losses = compute_losses(out.all_layer_mask_probs(), out.semantic_features, text_embeddings, batch.semantic,
                            batch.instance_masks, cfg.synthesis.ignore_index, o.ce_logit_scale)
    loss = total_loss(losses, o.loss_weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    return losses, loss


class LossWindow:
    """Loss sums since the last log line, kept on the device (no sync per step) and averaged over ranks."""

    def __init__(self, dist: Dist) -> None:
        self.dist = dist
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start, self.data_seconds = 0, time.monotonic(), 0.0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.steps += 1

    def means(self) -> dict[str, float]:
        names = sorted(self.sums)
        values = torch.stack([self.sums[n] for n in names]) / self.steps
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(values)
            values /= self.dist.world_size
        return dict(zip(names, values.tolist()))

    def report(self, step: int, stop: int, total_steps: int, lrs: list[float], bar: Any, log: Log,
               out_dir: Path) -> None:
        """Log the window's means (a line, and a record in ``log.jsonl``) and start a new window; a non-finite
        mean stops the run."""
        means = self.means()
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {means}")
        seconds = (time.monotonic() - self.start) / self.steps
        record = {"step": step, **means, "lr": lrs, "seconds_per_step": seconds,
                  "data_seconds_per_step": self.data_seconds / self.steps, "eta_seconds": seconds * (stop - step)}
        bar.set_postfix(loss=f"{means['total']:.3f}")
        log(f"step {step}/{total_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f" | lr {lrs[1]:.2e}/{lrs[0]:.2e} | {seconds:.3f} s/step (data {record['data_seconds_per_step']:.3f})"
            + f" | ETA {_hms(record['eta_seconds'])}", record=record, out_dir=out_dir)
        self.reset()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _logger(dist: Dist):
    """Rank 0 prints to stdout and appends ``record`` (if given) to ``<out_dir>/log.jsonl``; other ranks stay
    silent."""

    def log(message: str, record: dict[str, Any] | None = None, out_dir: Path | None = None) -> None:
        if not dist.main:
            return
        print(message, flush=True)
        if record is not None and out_dir is not None:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    return log


if __name__ == "__main__":
    sys.exit(main())
