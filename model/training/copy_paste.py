"""Training-sample synthesis (reference §4.3, supplementary B.2): augmented sources, copy-pasted onto a canvas.

One sample: draw ``n ~ U{1..max_objects}`` source images (with ``random_duplicate``, half the time all from one
concept), augment each one (random rescale, pad, crop, flip, then colour jitter, grayscale, blur, normalise),
and paste the object pixels of sources ``2..n`` onto source 1 (the canvas, background included) at uniform random
positions, later objects occluding earlier ones. Targets: a semantic map (0 background, concept ids ``1..C-1``,
``ignore_index`` on padding) and the instance stack (fully occluded instances stay as all-zero masks).

This module owns the synthesis parameters, the dataset (source drawing, composition, targets), the batch types
and the step sampler; the per-source augmentation is ``model.training.augment`` and the sources' objects
(``Instance``, from pseudo-masks or ground truth) are ``model.training.annotations``.

Every random choice of sample ``index`` comes from a numpy generator seeded by ``(seed, index)``, so a sample is a
pure function of its index: the data stream is fixed by the sequence of indices (see ``StepBatchSampler``),
whatever the number of loader workers, and resuming at step ``k`` only needs ``k``.

Conscious changes from the release (reference §7.2):
- the padding corner is uniform (each 0.25) instead of the release's skewed 0.25/0.19/0.14/0.42 (in
  ``augment_geometry``);
- the pasted bounding box includes the object's last row and column (the release drops them);
- an image retrieved under several concepts is labelled with the concept it was drawn under (the release labels
  it with the last such concept in config order, even when drawn from another concept's list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from model.config import IMAGENET_MEAN, IMAGENET_STD, reject_unknown_keys
from model.training.annotations import Instance, rasterise_instances
from model.training.augment import augment_geometry, augment_photometry


@dataclass(frozen=True)
class SynthesisParams:
    """Knobs of the synthesis; defaults are the official recipe (reference §4.1, §4.3)."""

    crop_size: int = 384
    max_objects: int = 10
    copy_paste: bool = True  # False: the ablation with one source image per sample
    random_duplicate: bool = True
    duplicate_prob: float = 0.5
    scale_range: tuple[float, float] = (0.1, 1.0)
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_kernel_fraction: float = 0.1  # kernel = int(fraction * crop // 2 * 2) + 1 (39 px at 384)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    ignore_index: int = 255
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("scale_range", "jitter", "blur_sigma", "image_mean", "image_std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        lo, hi = self.scale_range
        probs = ("duplicate_prob", "hflip_prob", "jitter_prob", "grayscale_prob", "blur_prob")
        checks = {
            "crop_size": self.crop_size >= 8,
            "max_objects": self.max_objects >= 1,
            "scale_range": 0.0 < lo <= hi,
            "blur_sigma": 0.0 < self.blur_sigma[0] <= self.blur_sigma[1],
            "ignore_index": self.ignore_index > 0,
            **{p: 0.0 <= getattr(self, p) <= 1.0 for p in probs},
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid synthesis parameter(s): " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    @property
    def blur_kernel(self) -> int:
        """The Gaussian blur kernel size in pixels (odd): ``blur_kernel_fraction`` of the crop."""
        return int(self.blur_kernel_fraction * self.crop_size // 2 * 2) + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SynthesisParams":
        """From a config's ``synthesis`` section; unknown keys are rejected."""
        reject_unknown_keys(d, cls, "synthesis parameter(s)")
        return cls(**d)


@dataclass
class TrainingSample:
    """image (3,S,S) float32 normalised; semantic (S,S) int64; instance_masks (K,S,S) bool; instance_labels (K,)."""

    image: torch.Tensor
    semantic: torch.Tensor
    instance_masks: torch.Tensor
    instance_labels: torch.Tensor


@dataclass
class TrainingBatch:
    """images (B,3,S,S); semantic (B,S,S) int64; ragged per-image instance stacks (K_b,S,S) bool and labels."""

    images: torch.Tensor
    semantic: torch.Tensor
    instance_masks: list[torch.Tensor] = field(default_factory=list)
    instance_labels: list[torch.Tensor] = field(default_factory=list)

    def pin_memory(self) -> "TrainingBatch":
        """Called by a DataLoader with ``pin_memory=True`` (custom batch types are otherwise left unpinned)."""
        return TrainingBatch(self.images.pin_memory(), self.semantic.pin_memory(),
                             [m.pin_memory() for m in self.instance_masks],
                             [lab.pin_memory() for lab in self.instance_labels])

    def to(self, device: torch.device | str) -> "TrainingBatch":
        """The batch on ``device`` (copies to CUDA are non-blocking)."""
        nb = torch.device(device).type == "cuda"
        return TrainingBatch(self.images.to(device, non_blocking=nb), self.semantic.to(device, non_blocking=nb),
                             [m.to(device, non_blocking=nb) for m in self.instance_masks],
                             [lab.to(device, non_blocking=nb) for lab in self.instance_labels])


def collate_samples(samples: Sequence[TrainingSample]) -> TrainingBatch:
    """DataLoader ``collate_fn``: stack images and semantic maps; keep the ragged instance stacks as lists."""
    return TrainingBatch(torch.stack([s.image for s in samples]), torch.stack([s.semantic for s in samples]),
                         [s.instance_masks for s in samples], [s.instance_labels for s in samples])


def load_rgb(path: str) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class CopyPasteDataset(torch.utils.data.Dataset):
    """Random training samples from retrieved images and their masks (reference §4.3).

    ``retrieval``: ``{concept: [image paths]}``; ``concepts``: the training vocabulary without "background"
    (concept ``concepts[i]`` gets label id ``i + 1``); ``annotations``: ``{image path: [Instance, ...]}`` for every
    retrieved path. ``__getitem__(index)`` is a pure function of ``(seed, index)``; any index >= 0 is valid and
    ``len()`` is only the number of retrieved entries (the release's nominal epoch).
    """

    def __init__(self, retrieval: Mapping[str, Sequence[str]], concepts: Sequence[str],
                 annotations: Mapping[str, Sequence[Instance]], params: SynthesisParams, seed: int,
                 load_image: Callable[[str], np.ndarray] = load_rgb, check_files: bool = True) -> None:
        unknown = [c for c in retrieval if c not in concepts]
        if unknown:
            raise ValueError(f"retrieval lists concepts that are not in the training vocabulary: {unknown[:5]}")
        self.params, self.seed, self.load_image = params, int(seed), load_image
        self.concepts = list(concepts)
        self.annotations = annotations
        # (path, label id) per concept in vocabulary order, and the flat list of all entries
        self.by_concept = [[(str(p), i + 1) for p in retrieval.get(c, ())] for i, c in enumerate(self.concepts)]
        self.by_concept = [entries for entries in self.by_concept if entries]
        self.flat = [e for entries in self.by_concept for e in entries]
        if not self.flat:
            raise ValueError("no retrieved images: the retrieval lists are empty")
        missing_ann = sorted({p for p, _ in self.flat if p not in annotations})
        if missing_ann:
            raise FileNotFoundError(f"{len(missing_ann)} retrieved image(s) have no mask, e.g. {missing_ann[0]}")
        if check_files:
            missing = sorted({p for p, _ in self.flat if not Path(p).is_file()})
            if missing:
                raise FileNotFoundError(f"{len(missing)} retrieved image file(s) not found, e.g. {missing[0]}")
        n_labels = len(self.concepts)
        for p, _ in self.flat:
            for inst in annotations[p]:
                if inst.label_id is not None and not 1 <= inst.label_id <= n_labels:
                    raise ValueError(f"{p}: instance label id {inst.label_id} outside 1..{n_labels}")

    def __len__(self) -> int:
        return len(self.flat)

    def __getitem__(self, index: int) -> TrainingSample:
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        sources = self.draw_sources(rng)
        augmented = [self.augment_source(path, label, rng) for path, label in sources]
        return compose(augmented, rng, self.params)

    def draw_sources(self, rng: np.random.Generator) -> list[tuple[str, int]]:
        """Pick the source images of one sample: a list of (path, label id), the canvas first."""
        p = self.params
        n = int(rng.integers(1, p.max_objects + 1)) if p.copy_paste else 1
        if p.random_duplicate and rng.random() < p.duplicate_prob:
            entries = self.by_concept[int(rng.integers(len(self.by_concept)))]
        else:
            entries = self.flat
        return [entries[int(i)] for i in rng.integers(len(entries), size=n)]

    def augment_source(self, path: str, label_id: int, rng: np.random.Generator) -> "AugmentedSource":
        """Load one source and apply the geometric then photometric augmentation."""
        image = self.load_image(path)
        instance_map, labels = rasterise_instances(self.annotations[path], image.shape[:2], label_id, path)
        image, instance_map = augment_geometry(image, instance_map, rng, self.params)
        pixels = augment_photometry(image, rng, self.params)
        return AugmentedSource(pixels, instance_map, labels)


@dataclass
class AugmentedSource:
    """pixels (3,S,S) float32 normalised; instance_map (S,S) int64 (0 bg, 1..k objects, -1 padding); labels (k,)."""

    pixels: torch.Tensor
    instance_map: np.ndarray
    labels: np.ndarray


def compose(sources: Sequence[AugmentedSource], rng: np.random.Generator, p: SynthesisParams) -> TrainingSample:
    """Copy-paste the objects of ``sources[1:]`` onto ``sources[0]`` and build the targets.

    Each later source's object pixels (instance map > 0) are pasted, as one block keeping their layout, with the
    top-left of their (inclusive) bounding box uniform over the positions where it fits. Sources without object
    pixels are skipped (their instances stay in the stack as all-zero masks).
    """
    canvas = sources[0].pixels.clone()
    instance_map = sources[0].instance_map.copy()  # global instance ids; -1 padding
    labels = list(sources[0].labels)
    crop = p.crop_size
    for src in sources[1:]:
        offset = len(labels)
        labels.extend(src.labels)
        obj = src.instance_map > 0
        if not obj.any():
            continue
        ys, xs = np.nonzero(obj)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        ty = int(rng.integers(crop - (y1 - y0) + 1))
        tx = int(rng.integers(crop - (x1 - x0) + 1))
        sel = obj[y0:y1, x0:x1]
        region = instance_map[ty:ty + y1 - y0, tx:tx + x1 - x0]
        region[sel] = src.instance_map[y0:y1, x0:x1][sel] + offset
        sel_t = torch.from_numpy(sel)
        canvas[:, ty:ty + y1 - y0, tx:tx + x1 - x0][:, sel_t] = src.pixels[:, y0:y1, x0:x1][:, sel_t]

    lut = np.concatenate([[0], np.asarray(labels, dtype=np.int64)])
    semantic = np.where(instance_map < 0, p.ignore_index, lut[np.maximum(instance_map, 0)])
    ids = np.arange(1, len(labels) + 1)
    instance_masks = instance_map[None] == ids[:, None, None]
    return TrainingSample(canvas, torch.from_numpy(semantic.astype(np.int64)), torch.from_numpy(instance_masks),
                          torch.as_tensor(labels, dtype=torch.int64))


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of sample indices for steps ``start_step .. total_steps - 1`` (a DataLoader ``batch_sampler``).

    Step ``t`` on rank ``r`` of ``world_size`` gets indices ``((t * world_size + r) * batch_size + i)``: every
    sample of the run is distinct and fixed by its step, so resuming at ``start_step`` replays nothing and skips
    nothing, and ranks never share a sample.
    """

    def __init__(self, batch_size: int, total_steps: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or not 0 <= start_step <= total_steps:
            raise ValueError(f"invalid sampler arguments: batch_size={batch_size}, steps {start_step}..{total_steps}, "
                             f"rank {rank} of {world_size}")
        self.batch_size, self.total_steps, self.start_step = batch_size, total_steps, start_step
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for t in range(self.start_step, self.total_steps):
            base = (t * self.world_size + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))

    def __len__(self) -> int:
        return self.total_steps - self.start_step


__all__ = ["SynthesisParams", "TrainingSample", "TrainingBatch", "CopyPasteDataset", "AugmentedSource",
           "collate_samples", "compose", "StepBatchSampler", "load_rgb"]
