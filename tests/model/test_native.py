"""Native geometry: a converted official checkpoint answers as the official code at every aspect ratio, alone and
in ragged batches (tests/model/official_reference.py is the independent reference).

The tiny random model has patch 8; the image sizes keep the issue's aspect ratios (240 x 320, 480 x 640,
333 x 500, 500 x 333) and their remainders that do not fill a patch. The scaled-down sizes run in every test run;
the listed sizes run once more, marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import read_metadata
from model.config import tiny_test_config
from model.vocabularies import load_vocabulary
from model.native import NativeSize, native_size_for, padded_fraction, preprocess_native
from model.network import ZUTIS
from model.predictor import Predictor
from model.rle import decode_rle
from service.schema import build_response
from tests.model.conftest import make_tiny_checkpoint, tiny_official_conversion
from tests.model.official_reference import TINY_VIT, official_forward, official_preprocess, predict

CAP = 640
SMALL_SIZES = [(120, 160), (160, 213), (111, 167), (167, 111)]  # 240x320, 480x640, 333x500, 500x333 scaled
LISTED_SIZES = [(240, 320), (480, 640), (333, 500), (500, 333)]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    converted = tiny_official_conversion(tmp_path_factory.mktemp("native"))
    converted["predictor"] = Predictor.from_checkpoint(converted["out"], device="cpu", dtype="float32", input_size=CAP)
    return converted


def structured_image(hw: tuple[int, int], seed: int) -> np.ndarray:
    """An (H, W, 3) uint8 image of a few smooth colour blobs plus noise (something for the masks to find)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    coarse = torch.from_numpy(rng.integers(0, 256, (3, 6, 8)).astype(np.float32))[None]
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    img = img + torch.from_numpy(rng.normal(0, 20, (h, w, 3)).astype(np.float32))
    return img.clamp(0, 255).round().to(torch.uint8).numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_matches_official(ours, image: np.ndarray, official, max_size: int | None = None) -> None:
    """The issue's criteria: semantic maps agree on >= 99.9 % of pixels; the same instances (same concept, mask
    IoU >= 0.99, |score difference| <= 1e-3)."""
    h, w = image.shape[:2]
    x = official_preprocess(image, max_size)
    ref = predict(official_forward(official["state"], TINY_VIT, x, dec_heads=2), official["text_ref"], (h, w))
    semantic_ref = ref["semantic"][0].numpy()
    assert ours.semantic.shape == (h, w)
    agreement = float((ours.semantic == semantic_ref).mean())
    assert agreement >= 0.999, f"semantic maps agree on {agreement:.4%} of pixels at {h}x{w}"
    assert len(np.unique(semantic_ref)) > 2  # a non-trivial map
    ref_instances = ref["instances"][0]
    assert ref_instances, "the random model should produce instances"
    assert len(ours.instances) == len(ref_instances), (h, w)
    unmatched = list(ours.instances)
    for r in ref_instances:
        found = None
        for o in unmatched:
            if o.concept_index == r["label"] and mask_iou(decode_rle(o.segmentation), r["mask"]) >= 0.99:
                found = o
                break
        assert found is not None, f"no instance matches the official query {r['query']} at {h}x{w}"
        unmatched.remove(found)
        assert abs(found.score - r["score"]) <= 1e-3


def test_converted_official_checkpoint_defaults_to_native(official) -> None:
    assert read_metadata(official["out"]).geometry == "native"
    assert Predictor.from_checkpoint(official["out"], device="cpu").geometry == "native"
    letterbox = Predictor.from_checkpoint(official["out"], device="cpu", geometry="letterbox")
    assert letterbox.geometry == "letterbox"


@pytest.mark.parametrize("hw", SMALL_SIZES)
def test_native_answers_equal_the_official_code(official, hw) -> None:
    image = structured_image(hw, seed=hw[0])
    ours = official["predictor"].predict([image], load_vocabulary("coco")[1:])[0]
    assert_matches_official(ours, image, official)


@pytest.mark.slow
@pytest.mark.parametrize("hw", LISTED_SIZES)
def test_native_answers_equal_the_official_code_at_the_listed_sizes(official, hw) -> None:
    image = structured_image(hw, seed=hw[1])
    ours = official["predictor"].predict([image], load_vocabulary("coco")[1:])[0]
    assert_matches_official(ours, image, official)


def test_native_batch_of_different_sizes_equals_the_official_code_and_each_image_alone(official) -> None:
    predictor = official["predictor"]
    concepts = load_vocabulary("coco")[1:]
    images = [structured_image(hw, seed=i) for i, hw in enumerate(SMALL_SIZES)]
    batched = predictor.predict(images, concepts, batch_size=len(images))
    for image, together in zip(images, batched):
        assert_matches_official(together, image, official)
        alone = predictor.predict([image], concepts)[0]
        assert build_response(together, "m").model_dump() == build_response(alone, "m").model_dump()
        assert np.array_equal(together.semantic, alone.semantic)


def test_native_cap_resizes_like_the_official_loader(official) -> None:
    # longer side 500 over a cap of 200: resized to 200 x 133 (int(333 / 500 * 200)), answered at 500 x 333
    image = structured_image((500, 333), seed=3)
    predictor = Predictor.from_checkpoint(official["out"], device="cpu", dtype="float32", input_size=200)
    prepared = predictor.prepare(image)
    assert prepared.placement == NativeSize((500, 333), 200, (200, 133))
    assert torch.equal(prepared.tensor[None], official_preprocess(image, 200))
    ours = predictor.predict([image], load_vocabulary("coco")[1:])[0]
    assert ours.image_hw == (500, 333)
    assert_matches_official(ours, image, official, max_size=200)


def test_native_size_rule() -> None:
    assert native_size_for((480, 640), 640).resized_hw == (480, 640)
    assert native_size_for((480, 640), 320).resized_hw == (240, 320)
    assert native_size_for((333, 500), 256).resized_hw == (170, 256)  # int(170.496)
    assert native_size_for((500, 333), 256).resized_hw == (256, 170)
    assert native_size_for((700, 700), 512).resized_hw == (512, 512)
    assert native_size_for((3, 4000), 1024).resized_hw == (1, 1024)  # never 0 pixels
    assert native_size_for((333, 500), 640).is_identity
    with pytest.raises(ValueError, match="positive"):
        native_size_for((0, 5), 64)
    with pytest.raises(ValueError, match="cap"):
        native_size_for((5, 5), 0)


def test_native_refuses_images_smaller_than_one_patch(official) -> None:
    with pytest.raises(ValueError, match="at least 8 pixels"):
        official["predictor"].prepare(np.zeros((5, 40, 3), np.uint8))
    x, size = preprocess_native(np.zeros((8, 9, 3), np.uint8), 64, (0.5,) * 3, (0.25,) * 3, min_side=8)
    assert x.shape == (3, 8, 9) and size.input_hw == (8, 9)


def test_padded_fraction() -> None:
    assert padded_fraction([10, 10]) == 0.0
    assert padded_fraction([10, 5]) == pytest.approx(0.25)
    assert padded_fraction([10], padded_length=20) == pytest.approx(0.5)
    assert padded_fraction([]) == 0.0
    with pytest.raises(ValueError, match="shorter"):
        padded_fraction([10], padded_length=5)


def test_old_checkpoints_keep_letterbox(tmp_path) -> None:
    old = make_tiny_checkpoint(tmp_path / "old.safetensors")
    assert read_metadata(old).geometry is None and read_metadata(old).inference_geometry == "letterbox"
    assert Predictor.from_checkpoint(old, device="cpu").geometry == "letterbox"
    native = make_tiny_checkpoint(tmp_path / "native.safetensors", geometry="native")
    assert read_metadata(native).inference_geometry == "native"
    with pytest.raises(ValueError, match="unknown geometry"):
        make_tiny_checkpoint(tmp_path / "bad.safetensors", geometry="square")
    with pytest.raises(ValueError, match="unknown geometry"):
        Predictor.from_checkpoint(old, device="cpu", geometry="square")


# -- the network on its own -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ZUTIS(tiny_test_config()).eval()


SIZES = [(60, 80), (80, 60), (41, 63), (64, 64), (8, 8), (17, 120)]


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_ragged_batch_equals_each_image_alone_bitwise(tiny, threads) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        images = [torch.randn(3, h, w, generator=gen) for h, w in SIZES]
        with torch.no_grad():
            batched = tiny.forward_ragged(images)
            for i, image in enumerate(images):
                alone = tiny.forward_ragged([image])
                gh, gw = alone.grid_hw[0]
                assert batched.grid_hw[i] == (gh, gw) == (image.shape[1] // 8 * 2, image.shape[2] // 8 * 2)
                assert torch.equal(batched.mask_probs[i, :, :gh, :gw], alone.mask_probs[0])
                assert torch.equal(batched.semantic_features[i, :gh, :gw], alone.semantic_features[0])
                assert not batched.mask_probs[i, :, gh:].any() and not batched.mask_probs[i, :, :, gw:].any()
    finally:
        torch.set_num_threads(before)


def test_ragged_padding_does_not_leak_between_images(tiny) -> None:
    gen = torch.Generator().manual_seed(5)
    small, big = torch.randn(3, 24, 40, generator=gen), torch.randn(3, 64, 72, generator=gen)
    with torch.no_grad():
        a = tiny.forward_ragged([small, big])
        b = tiny.forward_ragged([small, big * 3.0 + 1.0])
    gh, gw = a.grid_hw[0]
    assert torch.equal(a.mask_probs[0, :, :gh, :gw], b.mask_probs[0, :, :gh, :gw])
    assert torch.equal(a.semantic_features[0, :gh, :gw], b.semantic_features[0, :gh, :gw])


def test_ragged_equals_the_plain_forward_on_one_unpadded_image(tiny) -> None:
    image = torch.randn(3, 70, 45, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ragged = tiny.forward_ragged([image])
        plain = tiny(image[None])
    assert ragged.mask_probs.shape == plain.mask_probs.shape
    assert (ragged.mask_probs - plain.mask_probs).abs().max() <= 1e-5
    assert (ragged.semantic_features - plain.semantic_features).abs().max() <= 1e-5


def test_ragged_forward_is_inference_only(tiny) -> None:
    tiny.train()
    try:
        with pytest.raises(RuntimeError, match="inference"):
            tiny.forward_ragged([torch.randn(3, 16, 16)])
    finally:
        tiny.eval()
    with pytest.raises(ValueError, match="smaller than one patch"):
        with torch.no_grad():
            tiny.forward_ragged([torch.randn(3, 4, 16)])


def test_the_criteria_tell_letterbox_apart(official) -> None:
    """The comparison can fail: letterboxed into 640 x 640, a non-square image's answer is not the official one."""
    image = structured_image(SMALL_SIZES[1], seed=1)
    letterbox = Predictor.from_checkpoint(official["out"], device="cpu", input_size=CAP, geometry="letterbox")
    ours = letterbox.predict([image], load_vocabulary("coco")[1:])[0]
    with pytest.raises(AssertionError):
        assert_matches_official(ours, image, official)
