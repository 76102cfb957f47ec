import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.embedding_cache import TextEmbeddingCache
from model.dtypes import native_bf16_feature
from model.predictor import Predictor, resolve_dtype, resolve_precision
from model.rle import decode_semantic_rle
from service.schema import SegmentResponse, build_response


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (64, 40), (30, 30), (64, 64), (100, 20)]
    return [rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def test_predictor_outputs_at_original_size(predictor):
    preds = predictor.predict(images(3), ["cat", "dog", "Cat"])
    assert [p.image_hw for p in preds] == [(48, 64), (64, 40), (30, 30)]
    for p in preds:
        assert p.concepts == ["background", "cat", "dog"]
        assert p.semantic.shape == p.image_hw and p.semantic.max() < 3
        for inst in p.instances:
            assert inst.concept_index in (1, 2)
            m = mask_utils.decode(inst.segmentation)
            assert m.shape == p.image_hw and int(m.sum()) == inst.area > 0


def test_predictor_batch_composition_does_not_change_answers(predictor):
    ims = images(5, seed=1)
    batched = predictor.predict(ims, ["cat", "dog"], batch_size=5)
    alone = [predictor.predict([im], ["cat", "dog"])[0] for im in ims]
    for a, b in zip(batched, alone):
        ra = build_response(a, predictor.model_id).model_dump()
        rb = build_response(b, predictor.model_id).model_dump()
        assert ra == rb


def test_predictor_vocabulary_does_not_change_instance_masks(predictor):
    """The forward pass is vocabulary-free: the same image under two vocabularies has one set of proposals."""
    im = images(1)[0]
    prepared = predictor.prepare(im)
    out1 = predictor.forward([prepared])
    out2 = predictor.forward([prepared])
    assert torch.equal(out1.mask_probs, out2.mask_probs)


def test_predictor_overrides_and_cache(predictor):
    cache = TextEmbeddingCache(100)
    ims = images(2)
    a = predictor.predict(ims, ["cat"], cache=cache, score_threshold=0.0, max_instances=2)
    assert all(len(p.instances) <= 2 for p in a)
    b = predictor.predict(ims, ["cat"], cache=cache, score_threshold=0.0, max_instances=2)
    assert cache.misses == 2 and cache.hits == 2  # background + cat, then both hits
    assert [build_response(p, "m").model_dump() for p in a] == [build_response(p, "m").model_dump() for p in b]
    none = predictor.predict(ims, ["cat"], score_threshold=1.0)
    assert all(p.instances == [] for p in none)
    with pytest.raises(ValueError, match="mask_threshold"):
        predictor.predict(ims, ["cat"], mask_threshold=2.0)
    with pytest.raises(ValueError, match="unknown inference parameter"):
        predictor.predict(ims, ["cat"], thresh=0.1)


def test_predictor_accepts_pil_modes(predictor):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    gray = Image.new("L", (20, 50), 128)
    preds = predictor.predict([rgba, gray], ["cat"])
    assert [p.image_hw for p in preds] == [(30, 40), (50, 20)]


def test_predictor_response_schema_round_trip(predictor):
    pred = predictor.predict(images(1), ["cat", "dog"], score_threshold=0.0)[0]
    resp = build_response(pred, predictor.model_id, semantic="rle")
    again = SegmentResponse.model_validate_json(resp.model_dump_json())
    assert again == resp
    items = [{"concept_index": s.concept_index, "segmentation": s.segmentation.model_dump()}
             for s in resp.semantic.segments]
    assert np.array_equal(decode_semantic_rle(items, pred.image_hw), pred.semantic)


def test_predictor_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, bf16_feature=None) == (
        torch.float32, "auto on a CPU without native bfloat16 (no AMX or AVX-512 BF16)")
    assert resolve_precision("auto", cpu, bf16_feature="amx_bf16") == (
        torch.bfloat16, "auto on a CPU with native bfloat16 (amx_bf16)")
    assert resolve_precision("fp32", cpu, bf16_feature="amx_bf16")[0] == torch.float32
    assert resolve_precision("bf16", cpu, bf16_feature=None)[0] == torch.bfloat16  # asked for: allowed, slow
    expected = torch.bfloat16 if native_bf16_feature() else torch.float32
    assert resolve_dtype("auto", cpu) == expected  # this machine's CPU, detected
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        resolve_dtype("float16", cpu)


def test_predictor_text_embedding_independent_of_other_concepts(predictor):
    """A concept's embedding is the same whatever other concepts are encoded with it (cache misses batch up)."""
    alone = predictor.encode_concepts(["zebra"])[1][1]
    many = predictor.encode_concepts(["cat", "dog", "zebra", "red umbrella", "a very long concept name"])[1][3]
    assert torch.equal(alone, many)
