import numpy as np
import pytest
import torch

from model.predictor import Predictor
from model.runtime import resolve_runtime

pytest.importorskip("openvino")

# float32: the official-parity tolerance of the torch network's tests (tests/model/test_native.py,
# test_convert_official.py). bfloat16: the two runtimes round differently (OpenVINO fuses other operations).
TOLERANCE = {"float32": 1e-5, "bfloat16": 0.03}


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(48, 64), (64, 40), (30, 30)]]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zutis-cache")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("geometry", ["letterbox", "native"])
def test_openvino_forward_equals_torch_in_the_same_precision(tiny_checkpoint, cache_dir, dtype, geometry):
    """Batches of three differently sized images: letterboxed (one size) and native (ragged, three sizes)."""
    torch_p = Predictor.from_checkpoint(tiny_checkpoint, "cpu", dtype, geometry=geometry, runtime="torch")
    ov_p = Predictor.from_checkpoint(tiny_checkpoint, "cpu", dtype, geometry=geometry, runtime="openvino",
                                     cache_dir=cache_dir)
    assert ov_p.runtime == "openvino" and torch_p.runtime == "torch"
    batch = [torch_p.prepare(im) for im in images()]
    expected, got = torch_p.forward(batch), ov_p.forward(batch)
    assert got.grid_hw == expected.grid_hw
    assert got.mask_probs.shape == expected.mask_probs.shape
    assert (got.mask_probs - expected.mask_probs).abs().max() <= TOLERANCE[dtype]
    assert (got.semantic_features - expected.semantic_features).abs().max() <= TOLERANCE[dtype]


def test_openvino_answers_equal_torch_in_float32(tiny_checkpoint, cache_dir):
    torch_p = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", geometry="native", runtime="torch")
    ov_p = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", geometry="native", runtime="openvino",
                                     cache_dir=cache_dir)
    for a, b in zip(torch_p.predict(images(1), ["cat", "dog"]), ov_p.predict(images(1), ["cat", "dog"])):
        assert np.array_equal(a.semantic, b.semantic)
        assert [(i.concept, round(i.score, 5), i.bbox_xywh) for i in a.instances] == \
               [(i.concept, round(i.score, 5), i.bbox_xywh) for i in b.instances]


def test_openvino_export_is_cached_by_checkpoint_hash(tiny_checkpoint, tmp_path):
    """The first load exports and compiles; a second load (a restart) reuses both from disk."""
    first = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", runtime="openvino", cache_dir=tmp_path)
    first.forward([first.prepare(images()[0])])
    folder = tmp_path / "openvino" / first.sha256[:16]
    xml = folder / "image_network.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    blobs = sorted((folder / "compiled").iterdir())
    assert blobs, "OpenVINO wrote no compiled network to its cache"
    mtime = xml.stat().st_mtime_ns
    again = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", runtime="openvino", cache_dir=tmp_path)
    again.forward([again.prepare(images()[0])])
    assert xml.stat().st_mtime_ns == mtime  # not exported again
    assert sorted((folder / "compiled").iterdir()) == blobs  # nothing compiled anew
    assert [p.name for p in (tmp_path / "openvino").iterdir()] == [first.sha256[:16]]  # no temporary left


def test_an_unwritable_cache_still_serves_with_a_warning(tiny_checkpoint, tmp_path, caplog):
    """A cache the process cannot write (here a path through a file; in production a read-only volume): the
    network is exported to a private temporary folder, the answer is the same, and the log says what it costs."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    reference = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", runtime="openvino",
                                          cache_dir=tmp_path / "cache")
    with caplog.at_level("WARNING", logger="model.openvino_runtime"):
        blocked = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", runtime="openvino",
                                            cache_dir=blocker / "cache")
    assert any("cannot write the OpenVINO export" in r.getMessage() and "ZUTIS_CACHE_DIR" in r.getMessage()
               for r in caplog.records)
    image = [reference.prepare(images()[0])]
    assert torch.equal(blocked.forward(image).mask_probs, reference.forward(image).mask_probs)


def test_runtime_resolution():
    assert resolve_runtime("torch", "cpu")[0] == "torch"
    assert resolve_runtime("auto", "cpu")[0] == "openvino"  # installed here (this test is skipped otherwise)
    assert resolve_runtime("auto", "cuda")[0] == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_runtime("openvino", "cuda")
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_runtime("tensorrt", "cpu")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        from model.openvino_runtime import OpenVinoNetwork

        OpenVinoNetwork(None, None, torch.float16)  # type: ignore[arg-type]
