"""Post-processing time per image on CPU: our vectorised ``postprocess`` vs the plain path of the official code.

Synthetic but realistic outputs: a 480 x 640 image letterboxed into S = 640 (an 80 x 80 grid, 60 x 80 of it over
the image), Q = 100 proposals (noisy duplicates of a few objects, background "stuff" regions, near-empty ones),
E = 512, C = 81 concepts. The plain path upsamples all 100 probability maps to full resolution, then runs the
per-category greedy NMS loop with one numpy IoU per pair (reference §3.3-3.4). Both paths must return identical
instances; the script checks that before timing.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python benchmarks/postprocess_bench.py [--images 5] [--repeats 3]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.config import InferenceParams
from model.geometry import Letterbox, letterbox_for
from model.resample import resample_masks_to_image, resample_to_image, valid_grid_hw
from model.nms import greedy_mask_nms_loop, mask_nms
from model.postprocess import InstancePrediction, instance_candidates, postprocess
from model.rle import encode_masks, masks_to_boxes_xywh

IMAGE_HW = (480, 640)
INPUT_SIZE = 640
GRID = 80
QUERIES = 100
EMBED_DIM = 512
NUM_CONCEPTS = 81


def synthetic_outputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask_probs (Q, 80, 80), semantic_features (80, 80, E) unit-norm, text_embeddings (C, E) unit-norm)``."""
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(NUM_CONCEPTS, EMBED_DIM, generator=g), dim=1)
    vh = GRID * IMAGE_HW[0] // INPUT_SIZE
    yy, xx = torch.meshgrid(torch.arange(GRID).float(), torch.arange(GRID).float(), indexing="ij")
    feats = text[0].expand(GRID, GRID, EMBED_DIM).clone()
    objects = []
    classes = torch.randint(1, NUM_CONCEPTS, (4,), generator=g)
    for k in range(8):
        cy, cx = 5 + torch.rand(1, generator=g).item() * (vh - 10), 5 + torch.rand(1, generator=g).item() * 70
        ry, rx = (3 + 12 * torch.rand(2, generator=g)).tolist()
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        feats[inside] = text[int(classes[k % 4])]
        objects.append((cy, cx, ry, rx))
    jitter = torch.randn(GRID, GRID, EMBED_DIM, generator=g) * (0.5 / EMBED_DIM**0.5)  # norm ~0.5 per pixel
    feats = torch.nn.functional.normalize(feats + jitter, dim=-1)
    # Smooth noise so that mask borders are irregular, as real proposals are.
    noise = torch.nn.functional.interpolate(torch.randn(QUERIES, 1, 10, 10, generator=g), size=(GRID, GRID),
                                            mode="bilinear", align_corners=False)[:, 0]
    probs = torch.empty(QUERIES, GRID, GRID)
    for q in range(QUERIES):
        if q % 10 == 9:  # near-empty
            probs[q] = torch.sigmoid(noise[q] - 4.0)
            continue
        if q % 10 >= 7:  # a large background region
            cy, cx, ry, rx = vh * torch.rand(1, generator=g).item(), 80 * torch.rand(1, generator=g).item(), 25, 30
        else:  # a noisy duplicate of an object
            cy, cx, ry, rx = objects[q % len(objects)]
            cy, cx = cy + 1.5 * torch.randn(1, generator=g).item(), cx + 1.5 * torch.randn(1, generator=g).item()
            scale = 0.7 + 0.6 * torch.rand(1, generator=g).item()
            ry, rx = ry * scale, rx * scale
        dist = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2).sqrt()
        probs[q] = torch.sigmoid(6.0 * (1.0 - dist) + noise[q])
    probs[:, vh + 1:] *= 0.2  # the network sees padding there
    return probs, feats, text


def plain_postprocess(mask_probs: torch.Tensor, semantic_features: torch.Tensor, text_embeddings: torch.Tensor,
                      concepts: list[str], letterbox: Letterbox, params: InferenceParams) -> list[InstancePrediction]:
    """The official order of work: every proposal upsampled to full resolution and moved to numpy, background
    dropped, the per-category Python NMS loop over full-resolution masks, empty selections dropped."""
    # Scores and categories are batched tensor ops in the release too; what differs is everything after.
    valid = valid_grid_hw(letterbox, mask_probs.shape[1:])
    keep, scores, labels = instance_candidates(mask_probs, semantic_features, text_embeddings, params, valid)
    full = (resample_to_image(mask_probs, letterbox) > params.mask_threshold).numpy()  # all Q maps
    full = full[keep.numpy()]
    scores_np, labels_np = scores.numpy(), labels.numpy()
    kept = greedy_mask_nms_loop(full, scores_np, labels_np, params.nms_iou, params.score_threshold)
    kept = [k for k in kept if full[k].any() and scores_np[k] > params.score_threshold][: params.max_instances]
    masks = full[kept]
    boxes = masks_to_boxes_xywh(torch.from_numpy(masks)).tolist()
    # like model.postprocess, the instances keep their bool masks (model.answer encodes them)
    return [InstancePrediction(concept_index=int(labels_np[k]), concept=concepts[int(labels_np[k])],
                               score=float(scores_np[k]), bbox_xywh=tuple(box), area=int(m.sum()), mask=m)
            for k, m, box in zip(kept, masks, boxes)]


def _time_ms(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU milliseconds of ``repeats`` calls (CPU time is steadier on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - start_cpu) * 1e3)
        wall.append((time.perf_counter() - start) * 1e3)
    return wall, cpu


def _stage_cpu_ms(probs, feats, text, box, params) -> dict[str, float]:
    """CPU milliseconds of the vectorised path's stages, run in the same order as ``postprocess``."""
    marks = [time.process_time()]
    keep, scores, labels = instance_candidates(probs, feats, text, params, valid_grid_hw(box, (GRID, GRID)))
    marks.append(time.process_time())
    masks = resample_masks_to_image(probs[keep], box, params.mask_threshold)
    marks.append(time.process_time())
    kept = mask_nms(masks, scores, labels, params.nms_iou, params.score_threshold)
    marks.append(time.process_time())
    encode_masks(masks[kept])
    masks_to_boxes_xywh(masks[kept])
    marks.append(time.process_time())
    names = ["candidates", "resample", "nms", "rle+boxes"]
    return {name: (marks[i + 1] - marks[i]) * 1e3 for i, name in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5, help="distinct synthetic images")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per image and path")
    # One thread by default: both paths then run single-threaded (the numpy loop always does), and on a shared
    # machine OpenMP workers spinning for descheduled siblings make multi-threaded figures meaningless.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = InferenceParams()
    box = letterbox_for(IMAGE_HW, INPUT_SIZE)
    concepts = ["background", *(f"concept {i}" for i in range(1, NUM_CONCEPTS))]

    timings: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ("plain", "fast", "fast+semantic")}
    stages: dict[str, list[float]] = {}
    counts = []
    for seed in range(args.images):
        probs, feats, text = synthetic_outputs(seed)
        runs = {
            "plain": lambda: plain_postprocess(probs, feats, text, concepts, box, params),
            "fast": lambda: postprocess(probs, feats, text, concepts, box, params, semantic=False),
            "fast+semantic": lambda: postprocess(probs, feats, text, concepts, box, params, semantic=True),
        }
        fast, plain = runs["fast"](), runs["plain"]()  # also the warm-up
        if fast.instances != plain:
            raise SystemExit(f"image {seed}: the two paths disagree ({len(fast.instances)} vs {len(plain)} instances)")
        keep, _, _ = instance_candidates(probs, feats, text, params, valid_grid_hw(box, (GRID, GRID)))
        counts.append(f"{len(keep)}/{len(fast.instances)}")
        for name, run in runs.items():
            wall, cpu = _time_ms(run, args.repeats)
            timings[name][0].extend(wall)
            timings[name][1].extend(cpu)
        for name, ms in _stage_cpu_ms(probs, feats, text, box, params).items():
            stages.setdefault(name, []).append(ms)

    med = {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in timings.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); image {IMAGE_HW[0]}x{IMAGE_HW[1]}, "
          f"S={INPUT_SIZE}, grid {GRID}x{GRID}, Q={QUERIES}, E={EMBED_DIM}, C={NUM_CONCEPTS}; "
          f"{args.images} images x {args.repeats} runs")
    print("candidates (non-background, non-empty) / returned instances per image: " + ", ".join(counts))
    print("both paths return identical instances on every image")
    print("median ms/image                  wall      cpu")
    labels = {"plain": "plain path (official order)", "fast": "vectorised postprocess",
              "fast+semantic": "  + semantic label map"}
    for name, (wall, cpu) in med.items():
        print(f"{labels[name]:<30} {wall:8.1f} {cpu:8.1f}")
    speed_up = (med["plain"][0] / med["fast"][0], med["plain"][1] / med["fast"][1])
    print(f"speed-up (plain / vectorised)  {speed_up[0]:7.1f}x {speed_up[1]:7.1f}x")
    print("vectorised stages, median cpu ms: "
          + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
