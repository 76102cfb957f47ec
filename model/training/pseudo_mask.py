"""Training-data stage 3: one label-free salient-object mask per image, by spectral-cluster voting (§5.4).

For every feature extractor and every k in ``ks`` (default {2, 3, 4}): the extractor's feature grid is upsampled
2x (bilinear, align_corners=True), tokens are L2-normalised, the affinity ``A = F F^T`` is min-max normalised to
[0, 1], and the k smallest generalised eigenvectors of ``L v = lambda D v`` (``L = D - A``, ``D = diag(A 1)``) are
clustered with k-means into k segments. The segments of all extractors and all k are the candidates; "long"
candidates (bounding box spanning the full height or width: background-like) are dropped unless that drops all,
and the candidate with the largest summed IoU against the others wins the vote.

Feature extractors are callables ``PIL image -> (h, w, d) float tensor`` whose grid spans the whole image. Which
ones to use is the main quality/cost trade-off:

- ``ColourTextureFeatures`` (no weights, fast, fine grid): per-cell mean CIE-Lab colour and local lightness
  contrast. Good when the object differs from its surroundings in colour or texture (solid objects, clean
  backgrounds, the shapes world); splits multi-coloured objects and misses camouflaged ones. The honest baseline.
- ``ClipPatchFeatures`` (the retrieval CLIP, always at hand): last-layer patch tokens. Coarse (one token per
  14-16 px) and known to localise poorly when raw (docs: shapes-notes), so best as one voter among several.
- ``DinoFeatures`` (DINO ViT-S/16) and ``MocoFeatures`` (MoCo-v2 ResNet-50, dilated to stride 8): the
  self-supervised backbones SelfMask's own pseudo-labels were voted with; they need their weight files locally.

Eigenvectors are computed exactly and cheaply when tokens outnumber feature dimensions: ``A`` has rank <= d + 1,
so the symmetric ``D^-1/2 A D^-1/2`` is diagonalised through a thin QR of ``D^-1/2 [F, 1]`` (O(N d^2) time,
O(N d) memory) rather than a dense O(N^3) ``eigh`` (used, as the reference, when N <= d + 1).

Output directory: ``masks-00000.json``... shards, each ``{"format", "settings", "masks": {path: COCO RLE},
"failed": {path: reason}}``, written atomically. Reruns skip images already in a shard (resume, and incremental
when more images are added); shards made with other settings are an error. Masks are in the pixel grid of
``PIL.Image.open(path).convert("RGB")`` (no EXIF rotation), at the image's full resolution.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.clip_weights import load_state_strict
from model.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from model.mask_iou import pairwise_iou
from model.training.files import write_json_atomic

log = logging.getLogger(__name__)

FeatureExtractor = Callable[[Any], torch.Tensor]
PSEUDO_MASK_FORMAT = "zutis-pseudo-masks/1"
DEFAULT_KS = (2, 3, 4)


# -- spectral clustering ---------------------------------------------------------------------------------------
def _min_similarity(features: torch.Tensor) -> torch.Tensor:
    """``min_ij f_i . f_j`` over all token pairs, in the features' dtype.

    The minimising pair is searched in float32 row chunks of at most 2**22 products (never the full N x N
    matrix), then its product is recomputed in the features' own precision.
    """
    f32 = features.float()
    chunk = max(1, 2 ** 22 // f32.shape[0])
    best, best_i, best_j = math.inf, 0, 0
    for start in range(0, f32.shape[0], chunk):
        products = f32[start:start + chunk] @ f32.T
        flat = int(products.argmin())
        value = float(products.view(-1)[flat])
        if value < best:
            best, best_i, best_j = value, start + flat // f32.shape[0], flat % f32.shape[0]
    return features[best_i] @ features[best_j]


def spectral_embedding(features: torch.Tensor, k: int) -> torch.Tensor | None:
    """The ``k`` smallest generalised eigenvectors of ``L v = lambda D v`` for the min-max-normalised cosine graph.

    Args:
        features: ``(N, d)`` float, already L2-normalised per token.
        k: eigenvectors wanted (the trivial constant one included, as in the official ``lobpcg`` call).

    Returns:
        float64 ``(N, k)`` eigenvectors ordered by eigenvalue (smallest first), D-orthonormal
        (``v^T D v = I``), or ``None`` when all affinities are equal to float32 precision (the graph carries
        no structure).
    """
    f = features.double()
    n, d = f.shape
    top = (f * f).sum(dim=1).max()  # max_ij f_i . f_j is on the diagonal (Cauchy-Schwarz)
    low = _min_similarity(f)
    span = top - low
    if span <= 1e-6 * max(float(top), 1e-30):
        return None
    if n <= d + 1:
        return _eigenvectors_dense(f, low, span, k)
    # A = (F F^T - low 1 1^T) / span = U C U^T with U = [F, 1]: everything below stays N x (d + 1).
    u = torch.cat([f, torch.ones(n, 1, dtype=f.dtype, device=f.device)], dim=1)
    c = torch.cat([torch.full((d,), 1.0, dtype=f.dtype, device=f.device), -low.reshape(1)]) / span
    degree = (u @ (c * u.sum(dim=0))).clamp_min(1e-12)
    inv_sqrt_degree = degree.rsqrt()
    q, r = torch.linalg.qr(u * inv_sqrt_degree[:, None])  # D^-1/2 A D^-1/2 = Q (R C R^T) Q^T
    small = (r * c) @ r.T
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    # Smallest eigenvalues of I - D^-1/2 A D^-1/2 are the largest of D^-1/2 A D^-1/2. Directions outside
    # span(Q) have eigenvalue 1 in I - S: they carry no information and are never needed for k <= rank.
    order = torch.argsort(values, descending=True)[:k]
    return inv_sqrt_degree[:, None] * (q @ vectors[:, order])


def _eigenvectors_dense(f: torch.Tensor, low: torch.Tensor, span: torch.Tensor, k: int) -> torch.Tensor:
    """Reference solve: the dense symmetric eigenproblem of ``D^-1/2 L D^-1/2`` with ``torch.linalg.eigh``."""
    a = (f @ f.T - low) / span
    degree = a.sum(dim=1).clamp_min(1e-12)
    inv_sqrt_degree = degree.rsqrt()
    laplacian = torch.diag(degree) - a
    sym = inv_sqrt_degree[:, None] * laplacian * inv_sqrt_degree[None, :]
    _, vectors = torch.linalg.eigh((sym + sym.T) / 2)  # ascending eigenvalues
    return inv_sqrt_degree[:, None] * vectors[:, :k]


def kmeans(points: torch.Tensor, k: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs by inertia (sklearn's defaults).

    Deterministic: seeding draws from a CPU ``torch.Generator(seed)``. Converges when the squared centre shift
    is below ``tol`` times the mean per-dimension variance. Labels are renumbered in order of first appearance,
    so equal partitions give equal labels.

    Args:
        points: ``(N, d)`` float on any device; ``N >= k >= 1``.

    Returns:
        int64 ``(N,)`` cluster labels in ``[0, k)`` on the points' device.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k} for N={n}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be positive, got {n_init} and {max_iter}")
    # Float32 on a unit overall scale: k-means is scale-invariant, and eigenvector entries are tiny (~N^-1/2).
    x = points.double()
    x = (x / x.std().clamp_min(1e-300)).float()
    generator = torch.Generator().manual_seed(seed)
    tol_abs = tol * x.var(dim=0, unbiased=False).mean()
    x_sq = (x * x).sum(dim=1, keepdim=True)
    best_labels, best_inertia = None, math.inf
    for _ in range(n_init):
        centres = _kmeans_plusplus(x, k, generator, x_sq)
        for _ in range(max_iter):
            distances = _squared_distances(x, centres, x_sq)
            labels = distances.argmin(dim=1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
            for empty in torch.nonzero(counts == 0).flatten().tolist():  # re-seed at the worst-fit point
                far = distances.gather(1, labels[:, None]).squeeze(1).argmax()
                new[empty] = x[far]
                distances[far] = 0.0
            shift = ((new - centres) ** 2).sum()
            centres = new
            if shift <= tol_abs:
                break
        distances = _squared_distances(x, centres, x_sq)
        inertia, labels = distances.min(dim=1)
        if float(inertia.sum()) < best_inertia:
            best_inertia, best_labels = float(inertia.sum()), labels
    assert best_labels is not None
    first = torch.full((k,), n, dtype=torch.int64, device=x.device).scatter_reduce_(
        0, best_labels, torch.arange(n, device=x.device), reduce="amin")
    rank = torch.empty(k, dtype=torch.int64, device=x.device)
    rank[torch.argsort(first)] = torch.arange(k, device=x.device)
    return rank[best_labels]


def _squared_distances(x: torch.Tensor, centres: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` squared distances; ``x_sq`` is ``(N, 1)`` row norms squared, computed once per k-means call."""
    return (x_sq - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]).clamp_min(0.0)


def _kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, x_sq: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = _squared_distances(x, x[chosen], x_sq).squeeze(1)
    for _ in range(1, k):
        weights = nearest.cpu()
        if float(weights.sum()) <= 0.0:  # every point already coincides with a centre
            weights = torch.ones(n, dtype=weights.dtype)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, _squared_distances(x, x[chosen[-1:]], x_sq).squeeze(1))
    return x[chosen].clone()


def spectral_candidates(features: torch.Tensor, size_hw: tuple[int, int], ks: Sequence[int] = DEFAULT_KS,
                        max_tokens: int = 16384, n_init: int = 10, seed: int = 0) -> torch.Tensor:
    """Candidate masks of one feature grid: the k segments of spectral clustering for each k in ``ks``.

    Args:
        features: ``(h, w, d)`` float; the grid spans the whole image.
        size_hw: ``(H, W)`` of the returned masks (segments are resized nearest-neighbour).
        max_tokens: cap on ``N``; a larger upsampled grid is area-resampled down to fit (aspect kept).

    Returns:
        bool ``(sum(ks), H, W)`` on the features' device (no candidates when the graph is structureless).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (h, w, d), got shape {tuple(features.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cluster counts, got {list(ks)}")
    grid = features.float().permute(2, 0, 1)[None]
    grid = F.interpolate(grid, scale_factor=2.0, mode="bilinear", align_corners=True)
    gh, gw = grid.shape[-2:]
    if gh * gw > max_tokens:
        scale = math.sqrt(max_tokens / (gh * gw))
        grid = F.interpolate(grid, size=(max(1, int(gh * scale)), max(1, int(gw * scale))), mode="area")
        gh, gw = grid.shape[-2:]
    tokens = F.normalize(grid.flatten(2)[0].T, dim=1)  # (N, d)
    kmax = min(max(ks), tokens.shape[0])
    vectors = spectral_embedding(tokens, kmax)
    height, width = size_hw
    if vectors is None:
        return torch.zeros(0, height, width, dtype=torch.bool, device=features.device)
    masks = []
    for k in ks:
        k = min(k, tokens.shape[0])
        labels = kmeans(vectors[:, :k], k, n_init=n_init, seed=seed).view(1, 1, gh, gw)
        one_hot = (labels == torch.arange(k, device=labels.device).view(k, 1, 1, 1)).float().transpose(0, 1)
        masks.append(F.interpolate(one_hot, size=(height, width), mode="nearest-exact")[0] > 0.5)
    return torch.cat(masks).to(features.device)


# -- filtering and voting --------------------------------------------------------------------------------------
def is_long_mask(masks: torch.Tensor) -> torch.Tensor:
    """Whether each mask's bounding box spans the full height or the full width (background-like).

    ``masks``: bool ``(M, H, W)``. Returns bool ``(M,)``; empty masks are not long.
    """
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (M, H), (M, W)
    return (rows[:, 0] & rows[:, -1]) | (cols[:, 0] & cols[:, -1])


def filter_long_masks(masks: torch.Tensor) -> torch.Tensor:
    """Drop long masks (``is_long_mask``); if that would drop every mask, keep them all. bool ``(M', H, W)``."""
    keep = ~is_long_mask(masks)
    return masks[keep] if bool(keep.any()) else masks


def vote(masks: torch.Tensor) -> int:
    """Index of the mask with the largest summed IoU against all masks (itself included); first on ties."""
    if masks.shape[0] == 0:
        raise ValueError("no candidate masks to vote between")
    return int(pairwise_iou(masks).sum(dim=1).argmax())


def salient_mask(image: Any, extractors: Mapping[str, FeatureExtractor] | Sequence[FeatureExtractor],
                 ks: Sequence[int] = DEFAULT_KS, max_tokens: int = 16384, max_mask_side: int = 512,
                 n_init: int = 10, seed: int = 0) -> np.ndarray | None:
    """The voted salient-object mask of one PIL image: bool ``(H, W)`` numpy, or ``None`` without candidates.

    Candidates and the vote are computed at a working size whose longer side is at most ``max_mask_side``
    pixels; the winner is resized nearest-neighbour to the full ``(H, W)``.
    """
    extractor_list = list(extractors.values()) if isinstance(extractors, Mapping) else list(extractors)
    if not extractor_list:
        raise ValueError("at least one feature extractor is needed")
    width, height = image.size
    scale = min(1.0, max_mask_side / max(height, width))
    work_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
    candidates = [spectral_candidates(extract(image), work_hw, ks, max_tokens, n_init, seed).cpu()
                  for extract in extractor_list]
    masks = torch.cat(candidates)
    masks = masks[masks.flatten(1).any(dim=1)]
    if masks.shape[0] == 0:
        return None
    masks = filter_long_masks(masks)
    winner = masks[vote(masks)]
    if work_hw != (height, width):
        winner = F.interpolate(winner[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0] > 0.5
    return winner.numpy()


# -- feature extractors ----------------------------------------------------------------------------------------
def _fit_grid(size_wh: tuple[int, int], long_cells: int) -> tuple[int, int]:
    """Grid ``(rows, cols)`` with ``long_cells`` along the image's longer side, aspect kept (each >= 1)."""
    width, height = size_wh
    scale = long_cells / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _normalised_tensor(image: Any, size_hw: tuple[int, int], mean: Sequence[float],
                       std: Sequence[float]) -> torch.Tensor:
    """PIL image -> float32 ``(1, 3, h, w)``, resized bicubic to ``size_hw`` and normalised per channel."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (size_hw[1], size_hw[0]):
        image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ``(3, H, W)`` -> CIE-Lab (D65 white), ``(3, H, W)``: L in [0, 100], a/b roughly +-100."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                           [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,jhw->ihw", to_xyz, linear) / white.view(3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta ** 3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta ** 2) + 4.0 / 29.0)
    return torch.stack([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


class ColourTextureFeatures:
    """Weight-free features: per-cell mean Lab colour and local lightness contrast, on a fine grid.

    The image is divided into a grid with ``grid`` cells along its longer side (never finer than 2 px). Each
    cell holds ``[(Lab - image mean) / colour_scale, (contrast - image mean) / texture_scale, 1]`` where
    ``contrast`` is the standard deviation of L in a ``texture_window``-pixel box around each pixel, averaged
    over the cell. Centring and the constant last channel make the graph's cosine affinity a similarity kernel
    (equal cells: 1, cells ``colour_scale`` Lab units apart: about 0.5) instead of an angle about black.
    Returns float32 ``(h, w, 5)``.
    """

    def __init__(self, grid: int = 64, texture_window: int = 7, colour_scale: float = 10.0,
                 texture_scale: float = 5.0) -> None:
        if grid < 1 or texture_window < 1 or colour_scale <= 0 or texture_scale <= 0:
            raise ValueError("grid, texture_window, colour_scale and texture_scale must be positive")
        self.grid, self.window = grid, texture_window
        self.colour_scale, self.texture_scale = colour_scale, texture_scale

    def __call__(self, image: Any) -> torch.Tensor:
        rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        lab = rgb_to_lab(rgb)
        lightness = lab[:1][None]
        pad = self.window // 2
        padded = F.pad(lightness, (pad, self.window - 1 - pad, pad, self.window - 1 - pad), mode="replicate")
        mean = F.avg_pool2d(padded, self.window, stride=1)
        mean_sq = F.avg_pool2d(padded ** 2, self.window, stride=1)
        contrast = (mean_sq - mean ** 2).clamp_min(0.0).sqrt()
        height, width = lab.shape[-2:]
        # No finer than 2 px per cell: the graph's 2x upsampling then gives at most one token per pixel.
        cells = _fit_grid((width, height), min(self.grid, max(1, math.ceil(max(height, width) / 2))))
        colour = F.adaptive_avg_pool2d(lab[None], cells)[0]
        texture = F.adaptive_avg_pool2d(contrast, cells)[0]
        colour = (colour - colour.mean(dim=(1, 2), keepdim=True)) / self.colour_scale
        texture = (texture - texture.mean(dim=(1, 2), keepdim=True)) / self.texture_scale
        return torch.cat([colour, texture, torch.ones_like(texture)]).permute(1, 2, 0).contiguous()


class ClipPatchFeatures:
    """Last-layer patch tokens of a CLIP ViT (``model.backbone.encode_patch_tokens``: ``ln_post``, no CLS, no
    projection). The image is resized so its longer side is ``input_size`` (default the tower's) with both sides
    whole patches. Returns float32 ``(h, w, width)`` on the tower's device.
    """

    def __init__(self, visual: torch.nn.Module, input_size: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> None:
        self.visual = visual.eval()
        self.patch = int(visual.patch_size[0])
        self.long_cells = max(1, (input_size or int(visual.image_size[0])) // self.patch)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Any) -> torch.Tensor:
        from model.backbone import encode_patch_tokens

        rows, cols = _fit_grid(image.size, self.long_cells)
        param = next(self.visual.parameters())
        x = _normalised_tensor(image, (rows * self.patch, cols * self.patch), self.mean, self.std)
        with torch.inference_mode():
            tokens, h, w = encode_patch_tokens(self.visual, x.to(param.device, param.dtype))
        return tokens[0].float().view(h, w, -1)


class DinoFeatures:
    """DINO ViT-S/16 (timm ``vit_small_patch16_224.dino``, loaded from a local file, e.g. Facebook's
    ``dino_deitsmall16_pretrain.pth``): last-layer patch tokens after the final LayerNorm, CLS removed. The image
    is resized so its longer side is about ``max_side`` pixels in whole patches. Returns float32 ``(h, w, 384)``.
    """

    patch = 16

    def __init__(self, weights: str | Path, max_side: int = 448, device: str | torch.device = "cpu") -> None:
        import timm

        from model.clip_weights import read_state_dict

        state = read_state_dict(weights)  # FileNotFoundError naming the file
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith(("head.", "fc."))}
        self.model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0,
                                       dynamic_img_size=True)
        load_state_strict(self.model, state, f"DINO weights {weights}")
        self.model = self.model.to(device).eval()
        self.long_cells = max(1, max_side // self.patch)

    def __call__(self, image: Any) -> torch.Tensor:
        rows, cols = _fit_grid(image.size, self.long_cells)
        x = _normalised_tensor(image, (rows * self.patch, cols * self.patch), IMAGENET_MEAN, IMAGENET_STD)
        param = next(self.model.parameters())
        with torch.inference_mode():
            tokens = self.model.forward_features(x.to(param.device, param.dtype))
        return tokens[0, self.model.num_prefix_tokens:].float().view(rows, cols, -1)


class MocoFeatures:
    """MoCo-v2 ResNet-50 (torchvision layout, last two stages dilated: output stride 8), from a local file such
    as ``moco_v2_800ep_pretrain.pth.tar`` (``module.encoder_q.*`` keys; the MLP head is dropped). The image is
    resized so its longer side is about ``max_side`` pixels. Returns float32 ``(h, w, 2048)`` layer-4 features.
    """

    stride = 8

    def __init__(self, weights: str | Path, max_side: int = 320, device: str | torch.device = "cpu") -> None:
        import torchvision

        from model.clip_weights import read_state_dict

        state = read_state_dict(weights)
        if any(k.startswith("encoder_q.") for k in state):
            state = {k.removeprefix("encoder_q."): v for k, v in state.items() if k.startswith("encoder_q.")}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        net.fc = torch.nn.Identity()
        load_state_strict(net, state, f"MoCo weights {weights}")
        self.net = net.to(device).eval()
        self.long_cells = max(1, max_side // self.stride)

    def __call__(self, image: Any) -> torch.Tensor:
        rows, cols = _fit_grid(image.size, self.long_cells)
        x = _normalised_tensor(image, (rows * self.stride, cols * self.stride), IMAGENET_MEAN, IMAGENET_STD)
        n = self.net
        param = next(n.parameters())
        with torch.inference_mode():
            y = n.maxpool(n.relu(n.bn1(n.conv1(x.to(param.device, param.dtype)))))
            y = n.layer4(n.layer3(n.layer2(n.layer1(y))))
        return y[0].float().permute(1, 2, 0).contiguous()


# -- the stage -------------------------------------------------------------------------------------------------
def _shard_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("masks-[0-9][0-9][0-9][0-9][0-9].json"))


def generate_pseudo_masks(paths: Iterable[str | Path], extractors: Mapping[str, FeatureExtractor],
                          out_dir: str | Path, ks: Sequence[int] = DEFAULT_KS, shard_size: int = 1000,
                          progress: bool = True, *, max_tokens: int = 16384, max_mask_side: int = 512,
                          n_init: int = 10, seed: int = 0) -> Path:
    """Compute and store one salient-object mask per image (``salient_mask``), resumably.

    Args:
        paths: image files; duplicates are processed once. Images already in a shard of ``out_dir`` are skipped.
        extractors: named feature extractors; the names, ``ks`` and the numeric options form the settings every
            shard records. A shard with other settings in ``out_dir`` raises ``ValueError``. Only names are
            compared, so when an extractor's weights may change, put their identity in its name.
        out_dir: created if needed; receives ``masks-NNNNN.json`` shards of up to ``shard_size`` images.

    Returns:
        ``out_dir``. Unreadable images (logged warning) and images without any candidate (uniform images) are
        recorded under ``"failed"`` and not retried.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from model.rle import encode_masks

    if not extractors:
        raise ValueError("at least one feature extractor is needed")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"extractors": list(extractors), "ks": [int(k) for k in ks], "max_tokens": max_tokens,
                "max_mask_side": max_mask_side, "n_init": n_init, "seed": seed}
    done: set[str] = set()
    shard_files = _shard_files(out_dir)
    for shard_file in shard_files:
        shard = json.loads(shard_file.read_text())
        if shard.get("settings") != settings:
            raise ValueError(f"{shard_file} was made with other settings ({shard.get('settings')}, now {settings}); "
                             "use a new output directory")
        done.update(shard["masks"], shard["failed"])
    todo = [p for p in dict.fromkeys(str(p) for p in paths) if p not in done]
    next_shard = int(shard_files[-1].stem.split("-")[1]) + 1 if shard_files else 0
    bar = tqdm(total=len(done) + len(todo), initial=len(done), unit="img", desc="pseudo-masks",
               disable=not progress, smoothing=0.05)
    for start in range(0, len(todo), shard_size):
        masks: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for path in todo[start:start + shard_size]:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except Exception as error:  # an unreadable image is skipped, the run goes on
                log.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
                failed[path] = f"unreadable: {type(error).__name__}: {error}"
                bar.update(1)
                continue
            mask = salient_mask(image, extractors, ks, max_tokens, max_mask_side, n_init, seed)
            if mask is None:
                failed[path] = "no candidate segments (uniform features)"
            else:
                masks[path] = encode_masks(mask[None])[0]
            bar.update(1)
        write_json_atomic(out_dir / f"masks-{next_shard:05d}.json",
                          {"format": PSEUDO_MASK_FORMAT, "settings": settings, "masks": masks, "failed": failed})
        next_shard += 1
    bar.close()
    return out_dir


def load_pseudo_masks(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """All stored masks: ``{path: {"size": [H, W], "counts": str}}`` (COCO RLE; decode with ``model.rle``)."""
    out_dir = Path(out_dir)
    shard_files = _shard_files(out_dir) if out_dir.is_dir() else []
    if not shard_files:
        raise FileNotFoundError(f"no pseudo-mask shards (masks-NNNNN.json) in {out_dir}")
    masks: dict[str, dict[str, Any]] = {}
    for shard_file in shard_files:
        shard = json.loads(shard_file.read_text())
        if shard.get("format") != PSEUDO_MASK_FORMAT:
            raise ValueError(f"{shard_file}: unknown format {shard.get('format')!r}")
        masks.update(shard["masks"])
    return masks


# -- command line ----------------------------------------------------------------------------------------------
EXTRACTOR_NAMES = ("colour", "clip", "dino", "moco")


def build_extractors(names: Sequence[str], clip_visual: torch.nn.Module | None = None,
                     dino_weights: str | Path | None = None, moco_weights: str | Path | None = None,
                     device: str | torch.device = "cpu") -> dict[str, FeatureExtractor]:
    """Named extractors for ``names`` (a subset of ``EXTRACTOR_NAMES``); the weights each needs must be given."""
    extractors: dict[str, FeatureExtractor] = {}
    for name in names:
        if name == "colour":
            extractors[name] = ColourTextureFeatures()
        elif name == "clip":
            if clip_visual is None:
                raise ValueError("the clip extractor needs CLIP weights (--clip)")
            extractors[name] = ClipPatchFeatures(clip_visual)
        elif name == "dino":
            if dino_weights is None:
                raise ValueError("the dino extractor needs a DINO ViT-S/16 weights file (--dino)")
            extractors[name] = DinoFeatures(dino_weights, device=device)
        elif name == "moco":
            if moco_weights is None:
                raise ValueError("the moco extractor needs a MoCo-v2 ResNet-50 weights file (--moco)")
            extractors[name] = MocoFeatures(moco_weights, device=device)
        else:
            raise ValueError(f"unknown extractor {name!r}; choose from {', '.join(EXTRACTOR_NAMES)}")
    if not extractors:
        raise ValueError("at least one feature extractor is needed")
    return extractors


def main(argv: Sequence[str] | None = None) -> int:
    from model.training.index import list_images
    from model.training.retrieve import load_retrieval

    parser = argparse.ArgumentParser(prog="python -m model.pseudo_mask", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--retrieval", type=Path, help="retrieval.json (or its directory) from model.retrieve")
    source.add_argument("--images", nargs="+", type=Path, help="image folders (recursive)")
    parser.add_argument("--out", required=True, type=Path, help="pseudo-mask directory (reruns resume)")
    parser.add_argument("--extractors", default="colour",
                        help=f"comma-separated, from {', '.join(EXTRACTOR_NAMES)} (default: colour)")
    parser.add_argument("--clip", type=Path, help="CLIP weights for the clip extractor")
    parser.add_argument("--clip-arch", default=None, help="open_clip architecture when --clip is not ours")
    parser.add_argument("--dino", type=Path, help="DINO ViT-S/16 weights (e.g. dino_deitsmall16_pretrain.pth)")
    parser.add_argument("--moco", type=Path, help="MoCo-v2 ResNet-50 weights (e.g. moco_v2_800ep_pretrain.pth.tar)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    names = [n.strip() for n in args.extractors.split(",") if n.strip()]
    for flag, path in (("--clip", args.clip), ("--dino", args.dino), ("--moco", args.moco)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag} weights file not found: {path}")
    if args.retrieval is not None:
        paths = [p for ps in load_retrieval(args.retrieval).values() for p in ps]
    else:
        paths = list_images(args.images)
    clip_visual = None
    if "clip" in names and args.clip is not None:
        from model.clip_weights import load_clip
        from model.config import ModelConfig

        config = ModelConfig(clip_model=args.clip_arch) if args.clip_arch else None
        clip_visual = load_clip(args.clip, config).visual.to(args.device)
    extractors = build_extractors(names, clip_visual, args.dino, args.moco, args.device)
    out = generate_pseudo_masks(paths, extractors, args.out, shard_size=args.shard_size,
                                progress=not args.no_progress)
    print(f"{len(load_pseudo_masks(out))} pseudo-masks in {out}")
    return 0


__all__ = ["FeatureExtractor", "DEFAULT_KS", "spectral_embedding", "kmeans", "spectral_candidates", "is_long_mask",
           "filter_long_masks", "vote", "salient_mask", "rgb_to_lab",
           "ColourTextureFeatures", "ClipPatchFeatures", "DinoFeatures", "MocoFeatures", "build_extractors",
           "generate_pseudo_masks", "load_pseudo_masks", "EXTRACTOR_NAMES", "main"]
