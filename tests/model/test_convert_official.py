"""The official-checkpoint converter: a converted model computes what the official code computes.

A tiny random official-format state dict and a tiny random OpenAI-format CLIP state dict (fp16, OpenAI key
names) are saved as ``.pt`` files and converted; the converted checkpoint, loaded through ``Predictor`` /
``ZUTIS``, is compared with the independent reference of tests/model/official_reference.py on the same inputs at
native resolution (no letterbox).
"""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from model.checkpoint import read_metadata
from model.config import IMAGENET_MEAN, IMAGENET_STD, tiny_test_config
from model.convert_official import (
    OFFICIAL_INFERENCE,
    check_layout,
    convert_official,
    infer_architecture,
    main,
    official_model_config,
)
from model.vocabularies import load_vocabulary
from model.network import ZUTIS
from model.predictor import Predictor
from tests.model.conftest import tiny_official_conversion
from tests.model.official_reference import (
    TINY_CLIP,
    TINY_VIT,
    official_forward,
    predict,
    random_official_state_dict,
    random_openai_clip_state_dict,
)

SIZE = 64  # native resolution = the tiny config's input size: the letterbox is the identity


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    converted = tiny_official_conversion(tmp_path_factory.mktemp("official"), command="test-command")
    converted["predictor"] = Predictor.from_checkpoint(converted["out"], device="cpu", dtype="float32", input_size=SIZE)
    return converted


def _image(seed: int) -> np.ndarray:
    """A (SIZE, SIZE, 3) uint8 image with some large-scale structure (blobs for the masks to find) and noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (3, 8, 8)).astype(np.float32))[None]
    img = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")[0].permute(1, 2, 0)
    img = img + torch.from_numpy(rng.normal(0, 20, (SIZE, SIZE, 3)).astype(np.float32))
    return img.clamp(0, 255).round().to(torch.uint8).numpy()


def _normalise(img: np.ndarray) -> torch.Tensor:
    """Official preprocessing (§3.1), written out: to_tensor then ImageNet mean/std. -> (1, 3, H, W)."""
    x = torch.from_numpy(img).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(2, 0, 1)[None]


@pytest.mark.parametrize("hw", [(64, 64), (48, 64), (64, 52)])
def test_converted_network_matches_official_forward(converted, hw) -> None:
    model = converted["predictor"].model
    images = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0] + hw[1]))
    ref = official_forward(converted["state"], TINY_VIT, images, dec_heads=2)
    with torch.no_grad():
        out = model(images)
        model.train()  # dropout is 0 everywhere: training mode only adds the earlier layers' masks
        try:
            all_layers = model(images).all_layer_mask_probs()
        finally:
            model.eval()
    assert out.mask_probs.shape == ref["mask_proposals"][:, -1].shape
    assert (out.mask_probs - ref["mask_proposals"][:, -1]).abs().max() <= 1e-5
    assert (out.semantic_features - ref["patch_tokens"]).abs().max() <= 1e-5
    assert (all_layers - ref["mask_proposals"]).abs().max() <= 1e-5


def test_converted_network_matches_official_forward_in_float64(converted, tmp_path) -> None:
    # in float64 any remaining difference is a difference of computation, not of rounding
    model = ZUTIS(tiny_test_config())
    model.load_state_dict(converted["predictor"].model.state_dict())
    model = model.double().eval()
    state = {k: v.double() for k, v in converted["state"].items()}
    images = torch.randn(1, 3, 56, 64, dtype=torch.float64)
    ref = official_forward(state, TINY_VIT, images, dec_heads=2)
    with torch.no_grad():
        out = model(images)
    assert (out.mask_probs - ref["mask_proposals"][:, -1]).abs().max() <= 1e-10
    assert (out.semantic_features - ref["patch_tokens"]).abs().max() <= 1e-10


def test_converted_text_tower_matches_openai_text_encoder(converted) -> None:
    vocabulary, embeddings = converted["predictor"].encode_concepts(load_vocabulary("coco")[1:])
    assert vocabulary == load_vocabulary("coco")
    assert embeddings.shape == (81, 32)
    assert (embeddings - converted["text_ref"]).abs().max() <= 1e-5


@pytest.mark.parametrize("seed", [4, 6, 7])  # images where NMS suppresses and several categories survive
def test_converted_predictions_match_official_predictions(converted, seed) -> None:
    predictor = converted["predictor"]
    vocabulary = load_vocabulary("coco")
    image = _image(seed)
    prepared = predictor.prepare(image)
    assert prepared.letterbox.is_identity
    x = _normalise(image)
    assert torch.equal(prepared.tensor, x[0])
    ours = predictor.predict([image], vocabulary[1:])[0]
    assert ours.concepts == vocabulary

    outputs = official_forward(converted["state"], TINY_VIT, x, dec_heads=2)
    text = converted["text_ref"]
    ref = predict(outputs, text, (SIZE, SIZE))

    # Semantic argmax: identical wherever the reference's top-2 logit gap exceeds the float error.
    logits = F.interpolate(torch.einsum("ce,bhwe->bchw", text, outputs["patch_tokens"]), size=(SIZE, SIZE),
                           mode="bilinear", align_corners=False)[0]
    top2 = logits.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 1e-5).numpy()
    assert decided.mean() > 0.99
    semantic_ref = ref["semantic"][0].numpy()
    assert np.array_equal(ours.semantic[decided], semantic_ref[decided])
    assert len(np.unique(semantic_ref)) > 3  # a non-trivial map

    # Instances: the same (label, mask) set, scores to 1e-5. Mask pixels may differ only where the reference's
    # upsampled probability is within 1e-5 of the threshold.
    full = F.interpolate(outputs["mask_proposals"][:, -1], size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False)[0]
    ref_instances = ref["instances"][0]
    assert ref_instances, "the random model should produce instances"
    without_nms = predict(outputs, text, (SIZE, SIZE), nms_iou=1.0)["instances"][0]
    assert len(without_nms) > len(ref_instances), "the comparison should exercise NMS"
    assert len(ours.instances) == len(ref_instances)
    unmatched = list(ours.instances)
    for r in ref_instances:
        ambiguous = ((full[r["query"]] - 0.5).abs() <= 1e-5).numpy()
        match = None
        for o in unmatched:
            m = mask_utils.decode(o.segmentation).astype(bool)
            if o.concept_index == r["label"] and np.array_equal(m[~ambiguous], r["mask"][~ambiguous]):
                match = o
                break
        assert match is not None, f"no instance of ours matches the reference's query {r['query']} ({r['label']})"
        unmatched.remove(match)
        assert match.score == pytest.approx(r["score"], abs=1e-5)
        assert match.concept == vocabulary[r["label"]]
        x1, y1, x2, y2 = r["bbox"]
        if not ambiguous.any():
            assert match.bbox_xywh == (x1, y1, x2 - x1 + 1, y2 - y1 + 1)
            assert match.area == int(r["mask"].sum())


def test_converted_checkpoint_metadata(converted) -> None:
    meta = read_metadata(converted["out"])
    assert meta.vocabulary == load_vocabulary("coco")
    assert meta.inference == OFFICIAL_INFERENCE
    assert (meta.inference.mask_threshold, meta.inference.temperature, meta.inference.nms_iou,
            meta.inference.score_threshold) == (0.5, 5.0, 0.3, 0.001)
    assert meta.input_size == 640
    assert meta.prompt_templates is None
    assert meta.model_config == tiny_test_config()
    prov = meta.provenance
    for key in ("zutis", "clip"):
        path = converted[f"{key}_path"]
        assert prov[f"{key}_file"] == path.name
        assert prov[f"{key}_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["command"] == "test-command" and prov["vocabulary"] == "coco" and prov["date"]
    json.dumps(prov)


@pytest.mark.parametrize("arch,patch,grid", [("ViT-B-16", 16, 14), ("ViT-B-32", 32, 7)])
def test_official_config_has_the_release_layout(arch, patch, grid) -> None:
    # shapes only (meta tensors): our ViT-B network has exactly the 275 official keys and shapes
    official = random_official_state_dict(768, 12, 12, patch, grid, 512, 100, 6, 8, 2048, 256, device="meta")
    assert infer_architecture(official) == arch
    config = official_model_config(arch)
    with torch.device("meta"):
        ours = ZUTIS(config).state_dict()
    assert len(ours) == 275
    check_layout(official, ours, arch)
    assert config.image_mean == IMAGENET_MEAN and config.image_std == IMAGENET_STD
    assert (config.num_queries, config.decoder_layers, config.decoder_heads, config.decoder_ffn_dim,
            config.ffn_hidden_dim) == (100, 6, 8, 2048, 256)
    assert config.open_clip_config().get("quick_gelu") is True


# -- errors ----------------------------------------------------------------------------------------------------


def test_missing_files_are_named(converted, tmp_path, capsys) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        convert_official(missing, converted["clip_path"], "coco", tmp_path / "o.safetensors")
    with pytest.raises(FileNotFoundError, match="CLIP weights file not found: .*nope.pt"):
        convert_official(converted["zutis_path"], missing, "coco", tmp_path / "o.safetensors")
    rc = main(["--zutis", str(missing), "--clip", str(converted["clip_path"]), "--vocabulary", "coco",
               "--out", str(tmp_path / "o.safetensors")])
    assert rc == 2 and "nope.pt" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_vocabulary(converted, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown vocabulary"):
        convert_official(converted["zutis_path"], converted["clip_path"], "voc", tmp_path / "o.safetensors",
                         model_config=tiny_test_config())


def _convert_state(state, converted, tmp_path):
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return convert_official(path, converted["clip_path"], "coco", tmp_path / "o.safetensors",
                            model_config=tiny_test_config())


def test_bad_official_state_dicts(converted, tmp_path) -> None:
    state = dict(converted["state"])
    with pytest.raises(ValueError, match="missing \\['decoder.norm.bias'\\]"):
        _convert_state({k: v for k, v in state.items() if k != "decoder.norm.bias"}, converted, tmp_path)
    with pytest.raises(ValueError, match="unexpected \\['query_embed.weight'\\]"):
        _convert_state({**state, "query_embed.weight": state["query_embed"]}, converted, tmp_path)
    with pytest.raises(ValueError, match="wrong shapes \\['query_embed \\(11, 48\\)"):
        _convert_state({**state, "query_embed": torch.zeros(11, 48)}, converted, tmp_path)
    with pytest.raises(ValueError, match="non-finite values in \\['encoder.proj'\\]"):
        _convert_state({**state, "encoder.proj": torch.full_like(state["encoder.proj"], float("nan"))},
                       converted, tmp_path)
    with pytest.raises(ValueError, match="flat state dict"):
        _convert_state({"model": state, "epoch": 3}, converted, tmp_path)
    assert not (tmp_path / "o.safetensors").exists()


def test_clip_file_of_another_architecture_is_rejected(converted, tmp_path) -> None:
    # same text tower shapes, different image tower: the text weights would silently be the wrong ones
    other = random_openai_clip_state_dict(**{**TINY_CLIP, "patch": 16, "grid": 4}, seed=2)
    path = tmp_path / "ViT-other.pt"
    torch.save(other, path)
    with pytest.raises(ValueError, match="is not CLIP .*weights"):
        convert_official(converted["zutis_path"], path, "coco", tmp_path / "o.safetensors",
                         model_config=tiny_test_config())


def test_arch_is_inferred_and_checked(tmp_path, converted) -> None:
    path = tmp_path / "b16.pt"
    torch.save({"encoder.conv1.weight": torch.zeros(768, 3, 16, 16)}, path)
    with pytest.raises(ValueError, match="--arch ViT-B-32 given, but b16.pt has the patch size of ViT-B-16"):
        convert_official(path, converted["clip_path"], "coco", tmp_path / "o.safetensors", arch="ViT-B-32")
    with pytest.raises(ValueError, match="patch size 8"):
        convert_official(converted["zutis_path"], converted["clip_path"], "coco", tmp_path / "o.safetensors")
