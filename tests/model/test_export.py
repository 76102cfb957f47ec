import json

import numpy as np
import pytest
import torch

from model.export import main as export_main
from model.image_network import ImageNetwork, finish_outputs, network_inputs
from model.predictor import Predictor
from model.resample import valid_grid_hw
from tests.model.conftest import tiny_official_conversion
from tests.model.test_native import structured_image


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert export_main(["--format", "onnx", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


def test_exported_onnx_network_equals_torch_at_any_size(tiny_checkpoint, onnx_export):
    """One exported file, dynamic sizes: ONNX Runtime's outputs equal the torch image network's (float32)."""
    ort = pytest.importorskip("onnxruntime")
    meta = json.loads((onnx_export / "network.json").read_text())
    assert meta["file"] == "image_network.onnx" and meta["format"] == "onnx"
    session = ort.InferenceSession(str(onnx_export / meta["file"]), providers=["CPUExecutionProvider"])
    predictor = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", runtime="torch")
    assert meta["sha256"] == predictor.sha256
    network = ImageNetwork(predictor.model)
    for h, w in [(48, 64), (64, 40), (120, 88)]:
        x = torch.randn(1, 3, h, w)
        pos_embed, mask_pos = network_inputs(predictor.model, h, w)
        got = session.run(None, {"image": x.numpy(), "pos_embed": pos_embed.numpy(), "mask_pos": mask_pos.numpy()})
        with torch.no_grad():
            expected = network(x, pos_embed, mask_pos)
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape)
            assert np.abs(g - e.numpy()).max() <= 1e-5


@pytest.fixture(scope="module")
def converted_onnx(tmp_path_factory):
    """A converted tiny official release and its exported ONNX network."""
    root = tmp_path_factory.mktemp("converted")
    checkpoint = tiny_official_conversion(root)["out"]
    assert export_main(["--format", "onnx", str(checkpoint), "--out", str(root / "onnx")]) == 0
    return checkpoint, root / "onnx" / "image_network.onnx"


@pytest.mark.parametrize("geometry", ["native", "letterbox"])
def test_exported_onnx_network_gives_the_predictors_answer(converted_onnx, geometry):
    """The README's recipe: the exported network in ONNX Runtime + this project's preparation, text embeddings
    and post-processing give the same answer as ``Predictor.predict`` in float32 (a converted tiny release; in
    letterbox geometry the 120 x 160 image leaves a quarter of the square as padding)."""
    ort = pytest.importorskip("onnxruntime")
    checkpoint, onnx_path = converted_onnx
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    predictor = Predictor.from_checkpoint(checkpoint, "cpu", "float32", geometry=geometry, input_size=160,
                                          runtime="torch")
    picture = structured_image((120, 160), seed=3)
    prepared = predictor.prepare(picture)
    h, w = prepared.tensor.shape[-2:]
    pos_embed, mask_pos = network_inputs(predictor.model, h, w)
    probs, proj = session.run(None, {"image": prepared.tensor[None].numpy(), "pos_embed": pos_embed.numpy(),
                                     "mask_pos": mask_pos.numpy()})
    hp, wp = 2 * (h // predictor.patch_size), 2 * (w // predictor.patch_size)
    mask_probs, semantic, _ = finish_outputs([torch.from_numpy(probs).reshape(-1, hp, wp)],
                                             [torch.from_numpy(proj).reshape(hp, wp, -1)],
                                             [valid_grid_hw(prepared.placement, (hp, wp))])
    vocabulary, text = predictor.encode_concepts(["person", "car", "dog"])
    from model.network import ZUTISOutput

    got = predictor.postprocess(ZUTISOutput(mask_probs, semantic), 0, prepared, vocabulary, text,
                                predictor.params())
    expected = predictor.predict([picture], ["person", "car", "dog"])[0]
    assert np.array_equal(got.semantic, expected.semantic)
    assert [(i.concept, round(i.score, 5), i.segmentation["counts"]) for i in got.instances] == \
           [(i.concept, round(i.score, 5), i.segmentation["counts"]) for i in expected.instances]
    assert expected.instances  # the comparison is not vacuous


def test_exported_openvino_network_runs(tiny_checkpoint, tmp_path):
    ov = pytest.importorskip("openvino")
    assert export_main(["--format", "openvino", str(tiny_checkpoint), "--out", str(tmp_path)]) == 0
    compiled = ov.Core().compile_model(str(tmp_path / "image_network.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    predictor = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", runtime="torch")
    x = torch.randn(1, 3, 40, 56)
    pos_embed, mask_pos = network_inputs(predictor.model, 40, 56)
    got = compiled({"image": x.numpy(), "pos_embed": pos_embed.numpy(), "mask_pos": mask_pos.numpy()})
    with torch.no_grad():
        expected = ImageNetwork(predictor.model)(x, pos_embed, mask_pos)
    assert np.abs(got["mask_probs"] - expected[0].numpy()).max() <= 1e-5
    assert np.abs(got["text_proj"] - expected[1].numpy()).max() <= 1e-5


def test_export_command_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_main(["--format", "onnx", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)])
    assert exc.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        export_main(["--format", "tflite", "x", "--out", str(tmp_path)])
    assert exc.value.code == 2
