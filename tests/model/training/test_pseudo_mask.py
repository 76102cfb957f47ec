"""model.pseudo_mask: spectral-cluster voting parts against independent references, object recovery on
synthetic scenes, the resumable stage, the feature extractors and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from model.mask_iou import mask_iou, pairwise_iou
from model.rle import decode_rle
from model.training.pseudo_masks.clustering import (_eigenvectors_dense, filter_long_masks, is_long_mask, kmeans,
                                                   salient_mask, spectral_candidates, spectral_embedding, vote)
from model.training.pseudo_masks.command import main
from model.training.pseudo_masks.features import (ClipPatchFeatures, ColourTextureFeatures, DinoFeatures,
                                                 MocoFeatures, rgb_to_lab)
from model.training.pseudo_masks.shards import generate_pseudo_masks, load_pseudo_masks
from tests.model.training.test_index import tiny_clip


def synthetic_scene(shape: str, background: str, size: int = 128, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A solid red object on a textured background; returns the image and the true (H, W) bool mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    if background == "noise":
        image = rng.normal(120, 35, (size, size, 3))
    elif background == "stripes":
        image = np.where(((xx // 8) % 2)[..., None] == 0, [200, 200, 60], [60, 120, 200]).astype(float)
        image += rng.normal(0, 10, image.shape)
    elif background == "checkers":
        image = np.where((((xx // 16) + (yy // 16)) % 2)[..., None] == 0, [230, 230, 230], [40, 40, 40])
        image = image.astype(float) + rng.normal(0, 10, (size, size, 3))
    else:
        raise ValueError(background)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    s = size / 128
    if shape == "ellipse":
        draw.ellipse([30 * s, 40 * s, 100 * s, 95 * s], fill=1)
    else:  # a five-pointed star
        angles = np.pi / 5 * np.arange(10) - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 42, 18) * s
        draw.polygon([(64 * s + r * np.cos(a), 66 * s + r * np.sin(a)) for r, a in zip(radii, angles)], fill=1)
    mask = np.asarray(canvas, dtype=bool)
    image[mask] = [220, 30, 40]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), mask


@pytest.fixture(autouse=True)
def _one_thread():
    """These are many tiny tensor ops: on a shared 2-core machine, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the acceptance test -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, background", [("ellipse", "noise"), ("star", "stripes"), ("ellipse", "checkers")])
def test_recovers_a_clean_synthetic_object_without_weights(shape, background):
    image, truth = synthetic_scene(shape, background)
    mask = salient_mask(image, {"colour": ColourTextureFeatures()})
    assert mask.shape == truth.shape and mask.dtype == bool
    assert mask_iou(mask, truth) >= 0.9


# -- spectral clustering ---------------------------------------------------------------------------------------
def _generalised_reference(features: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scipy's dense generalised solve of L v = lambda D v on the min-max-normalised cosine affinity."""
    f = features.double().numpy()
    a = f @ f.T
    a = (a - a.min()) / (a.max() - a.min())
    d = np.diag(a.sum(1))
    values, vectors = scipy.linalg.eigh(d - a, d)
    return values[:k], vectors[:, :k]


@pytest.mark.parametrize("n, d", [(60, 5), (40, 12), (12, 30)])  # low-rank path twice, dense path once
def test_spectral_embedding_solves_the_generalised_eigenproblem(n, d):
    torch.manual_seed(n)
    features = F.normalize(torch.randn(n, d), dim=1)
    k = 4
    vectors = spectral_embedding(features, k).numpy()
    ref_values, ref_vectors = _generalised_reference(features, k)
    f = features.double().numpy()
    a = f @ f.T
    a = (a - a.min()) / (a.max() - a.min())
    degree = np.diag(a.sum(1))
    laplacian = degree - a
    np.testing.assert_allclose(vectors.T @ degree @ vectors, np.eye(k), atol=1e-8)  # D-orthonormal
    values = np.diag(vectors.T @ laplacian @ vectors)
    np.testing.assert_allclose(values, ref_values, atol=1e-8)
    np.testing.assert_allclose(laplacian @ vectors, degree @ vectors * values, atol=1e-8)
    # Same subspace as scipy's (eigenvalues here are distinct, so each vector agrees up to sign).
    np.testing.assert_allclose(np.abs(np.sum(vectors * (degree @ ref_vectors), axis=0)), np.ones(k), atol=1e-6)


def test_low_rank_and_dense_solves_agree():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(80, 6), dim=1).double()
    low = (f @ f.T).min()
    span = 1.0 - low
    dense = _eigenvectors_dense(f, low, span, 3)
    fast = spectral_embedding(f, 3)
    torch.testing.assert_close(fast.abs(), dense.abs(), atol=1e-8, rtol=0)


def test_spectral_embedding_of_identical_tokens_is_none():
    assert spectral_embedding(torch.ones(10, 3) / 3 ** 0.5, 2) is None


def test_spectral_candidates_separate_two_regions():
    features = torch.zeros(8, 8, 3)
    features[..., 0] = 1.0
    features[2:6, 3:7] = torch.tensor([0.0, 1.0, 0.0])
    masks = spectral_candidates(features, (32, 32), ks=(2,))
    truth = torch.zeros(32, 32, dtype=torch.bool)
    truth[8:24, 12:28] = True
    assert masks.shape == (2, 32, 32)
    assert max(mask_iou(m, truth) for m in masks) > 0.85


def test_kmeans_is_deterministic_and_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.randint(3, (300,), generator=g)
    points = centres[truth] + 0.5 * torch.randn(300, 2, generator=g)
    labels = kmeans(points, 3, seed=7)
    assert torch.equal(labels, kmeans(points, 3, seed=7))
    # Labels are numbered by first appearance, so a correct partition equals the truth renumbered that way.
    first = {int(t): None for t in truth}
    renumber = {t: i for i, t in enumerate(first)}
    assert torch.equal(labels, torch.tensor([renumber[int(t)] for t in truth]))
    assert torch.equal(kmeans(points, 3, seed=1), labels)  # another seed finds the same optimum
    with pytest.raises(ValueError):
        kmeans(points[:2], 3)


def test_kmeans_handles_duplicate_points():
    points = torch.tensor([[0.0], [0.0], [0.0], [5.0]])
    labels = kmeans(points, 2)
    assert labels.tolist() == [0, 0, 0, 1]


# -- filtering, voting, IoU ------------------------------------------------------------------------------------
def test_long_mask_filter():
    masks = torch.zeros(5, 10, 12, dtype=torch.bool)
    masks[0, :, 4:6] = True  # full height
    masks[1, 3:5, :] = True  # full width
    masks[2, 2:8, 2:9] = True  # inside
    masks[3, 0:4, 0:11] = True  # touches top and left, spans neither fully
    # masks[4] stays empty
    assert is_long_mask(masks).tolist() == [True, True, False, False, False]
    assert torch.equal(filter_long_masks(masks), masks[2:])
    assert torch.equal(filter_long_masks(masks[:2]), masks[:2])  # all long: keep all


def test_vote_picks_the_consensus_mask():
    masks = torch.zeros(4, 10, 10, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True  # outlier
    masks[1, 4:9, 4:9] = True
    masks[2, 4:9, 4:8] = True
    masks[3, 5:9, 4:9] = True
    iou = pairwise_iou(masks)
    assert iou[1, 2] == pytest.approx(20 / 25) and iou[0, 1] == 0.0 and iou[1, 1] == 1.0
    # Row sums: [1, 1 + 0.8 + 0.8, 1 + 0.8 + 16/24, 1 + 0.8 + 16/24]: mask 1 wins.
    assert vote(masks) == 1
    assert vote(masks[[2, 3]]) == 0  # tie: first
    with pytest.raises(ValueError):
        vote(masks[:0])


def test_mask_iou_exact_values():
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[0:4, 0:4] = True
    b[2:6, 2:6] = True
    assert mask_iou(a, b) == pytest.approx(4 / 28)
    assert mask_iou(torch.from_numpy(a), a) == 1.0
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(ValueError):
        mask_iou(a, b[:5])


def test_rgb_to_lab_reference_values():
    rgb = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]).T.reshape(3, 1, 4)
    lab = rgb_to_lab(rgb).reshape(3, 4).T
    expected = torch.tensor([[53.24, 80.09, 67.20], [100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.39, 0.0, 0.0]])
    torch.testing.assert_close(lab, expected, atol=0.02, rtol=0)


# -- extractors ------------------------------------------------------------------------------------------------
def test_colour_features_layout():
    image = Image.new("RGB", (90, 60), (10, 200, 30))
    features = ColourTextureFeatures(grid=30)(image)
    assert features.shape == (20, 30, 5)
    # A uniform image: every cell equals the mean, so only the constant channel is nonzero.
    torch.testing.assert_close(features[..., :4], torch.zeros(20, 30, 4), atol=1e-4, rtol=0)
    assert torch.all(features[..., 4] == 1.0)
    assert salient_mask(image, [ColourTextureFeatures(grid=30)]) is None  # no structure, no mask
    assert ColourTextureFeatures(grid=64)(Image.new("RGB", (20, 11))).shape == (6, 10, 5)  # cells >= 2 px


def test_clip_patch_features_shape():
    clip = tiny_clip()
    features = ClipPatchFeatures(clip.visual)(Image.new("RGB", (100, 50), (1, 2, 3)))
    assert features.shape == (4, 8, 48)  # longer side 64 px = 8 patches of 8 px


@pytest.mark.slow
def test_dino_and_moco_extractors_load_local_weights(tmp_path):
    import timm
    import torchvision

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "dino.pth")
    dino = DinoFeatures(tmp_path / "dino.pth", max_side=96)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    features = dino(image)
    assert features.shape == (3, 6, 384)
    torch.testing.assert_close(dino.model.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)

    resnet = torchvision.models.resnet50(weights=None)
    moco_state = {f"module.encoder_q.{k}": v for k, v in resnet.state_dict().items()}
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": moco_state}, tmp_path / "moco.pth.tar")
    moco = MocoFeatures(tmp_path / "moco.pth.tar", max_side=96)
    assert moco(image).shape == (5, 12, 2048)

    with pytest.raises(FileNotFoundError, match="no-dino.pth"):
        DinoFeatures(tmp_path / "no-dino.pth")
    with pytest.raises(ValueError, match="do not match"):
        MocoFeatures(tmp_path / "dino.pth")


# -- the stage -------------------------------------------------------------------------------------------------
def _write_scenes(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    paths, truths = [], []
    for i in range(count):
        image, truth = synthetic_scene("ellipse", "noise", size=48 + 8 * i, seed=i)
        path = folder / f"scene{i}.png"
        image.save(path)
        paths.append(str(path))
        truths.append(truth)
    return paths, truths


def test_generate_pseudo_masks_stores_resumes_and_loads(tmp_path, caplog):
    paths, truths = _write_scenes(tmp_path / "images", 4)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not a png")
    calls = []
    colour = ColourTextureFeatures(grid=24)

    def counting(image):
        calls.append(image.size)
        return colour(image)

    out = tmp_path / "masks"
    generate_pseudo_masks(paths[:2] + [str(broken)] + paths[:1], {"colour": counting}, out, shard_size=2,
                          progress=False)
    assert len(calls) == 2 and "broken.png" in caplog.text
    assert sorted(p.name for p in out.glob("masks-*.json")) == ["masks-00000.json", "masks-00001.json"]
    assert json.loads((out / "masks-00001.json").read_text())["failed"][str(broken)].startswith("unreadable")

    generate_pseudo_masks(paths + [str(broken)], {"colour": counting}, out, shard_size=2, progress=False)
    assert len(calls) == 4  # only the two new images
    masks = load_pseudo_masks(out)
    assert sorted(masks) == sorted(paths)
    for path, truth in zip(paths, truths):
        decoded = decode_rle(masks[path])
        assert decoded.shape == truth.shape
        assert mask_iou(decoded, truth) > 0.8

    with pytest.raises(ValueError, match="other settings"):
        generate_pseudo_masks(paths, {"colour": counting}, out, ks=(2, 3), progress=False)
    with pytest.raises(FileNotFoundError):
        load_pseudo_masks(tmp_path / "empty")


def test_cli_generates_masks_from_a_retrieval_file(tmp_path, capsys):
    paths, _ = _write_scenes(tmp_path / "images", 2)
    (tmp_path / "retrieval.json").write_text(json.dumps({"cat": paths, "dog": paths[::-1]}))
    assert main(["--retrieval", str(tmp_path / "retrieval.json"), "--out", str(tmp_path / "masks"),
                 "--no-progress"]) == 0
    assert sorted(load_pseudo_masks(tmp_path / "masks")) == sorted(paths)
    assert "2 pseudo-masks" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="dino.pth"):
        main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "m2"), "--extractors", "colour,dino",
              "--dino", str(tmp_path / "dino.pth")])
    with pytest.raises(ValueError, match="--dino"):
        main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "m2"), "--extractors", "dino"])
