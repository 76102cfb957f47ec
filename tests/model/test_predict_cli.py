import json

import numpy as np
import pytest
from PIL import Image

from model.predict import main, split_concepts
from model.predictor import Predictor
from service.schema import SegmentResponse, build_response


def test_predict_cli_split_concepts():
    assert split_concepts(["cat, dog", "red umbrella", " ,"]) == ["cat", "dog", "red umbrella"]


def test_predict_cli_prints_the_service_json_and_draws_overlay(tiny_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(img)
    assert main(["--checkpoint", str(tiny_checkpoint), "--image", str(img), "--concepts", "cat,dog",
                 "--score-threshold", "0", "--overlay", str(tmp_path / "o.png"), "--device", "cpu",
                 "--dtype", "float32", "--runtime", "torch"]) == 0
    printed = SegmentResponse.model_validate_json(capsys.readouterr().out)
    expected = build_response(
        Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32").predict([Image.open(img)], ["cat", "dog"],
                                                                  score_threshold=0.0)[0],
        printed.model)
    assert printed.model_dump(exclude={"timings"}) == expected.model_dump(exclude={"timings"})
    overlay = Image.open(tmp_path / "o.png")
    assert overlay.size == (56, 40) and overlay.mode == "RGB"
    if printed.instances:  # masks are tinted: the overlay differs from the input
        assert np.asarray(overlay).tolist() != np.asarray(Image.open(img)).tolist()


@pytest.mark.parametrize("args,message", [
    (["--image", "missing.png"], "file not found: missing.png"),
    (["--concepts", " , "], "no concepts"),
])
def test_predict_cli_errors_are_clear(tiny_checkpoint, tmp_path, capsys, args, message):
    img = tmp_path / "in.png"
    Image.new("RGB", (10, 10)).save(img)
    base = {"--checkpoint": str(tiny_checkpoint), "--image": str(img), "--concepts": "cat"}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as exc:
        main([x for kv in base.items() for x in kv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_predict_cli_rejects_non_image(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--image", str(bad), "--concepts", "cat"])
    assert "cannot read" in capsys.readouterr().err


def test_predict_cli_answers_phone_photos_upright(tiny_checkpoint, tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 8  # stored 40 wide x 24 high, seen 24 x 40
    photo = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(photo, format="MPO", save_all=True, exif=exif.tobytes(),
                                                   append_images=[Image.new("RGB", (40, 24))])
    base = ["--checkpoint", str(tiny_checkpoint), "--image", str(photo), "--concepts", "cat", "--device", "cpu",
            "--semantic", "none"]
    assert main(base + ["--overlay", str(tmp_path / "o.png")]) == 0
    assert SegmentResponse.model_validate_json(capsys.readouterr().out).image.model_dump() == {"width": 24,
                                                                                               "height": 40}
    assert Image.open(tmp_path / "o.png").size == (24, 40)
    assert main(base + ["--no-exif-orientation"]) == 0
    assert SegmentResponse.model_validate_json(capsys.readouterr().out).image.model_dump() == {"width": 40,
                                                                                               "height": 24}


def test_predict_cli_geometry_native(tiny_checkpoint, tmp_path, capsys):
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (37, 90, 3), dtype=np.uint8)).save(img)
    assert main(["--checkpoint", str(tiny_checkpoint), "--image", str(img), "--concepts", "cat,dog",
                 "--score-threshold", "0", "--device", "cpu", "--geometry", "native", "--dtype", "float32",
                 "--runtime", "torch"]) == 0
    printed = SegmentResponse.model_validate_json(capsys.readouterr().out)
    native = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", geometry="native")
    expected = build_response(native.predict([Image.open(img)], ["cat", "dog"], score_threshold=0.0)[0],
                              printed.model)
    assert printed.model_dump(exclude={"timings"}) == expected.model_dump(exclude={"timings"})
    letterbox = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32")
    other = build_response(letterbox.predict([Image.open(img)], ["cat", "dog"], score_threshold=0.0)[0],
                           printed.model)
    assert printed.model_dump(exclude={"timings"}) != other.model_dump(exclude={"timings"})
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--image", str(img), "--concepts", "cat", "--geometry", "x"])


def test_predict_cli_openvino_runtime_answers_like_torch(tiny_checkpoint, tmp_path, capsys):
    """``--runtime openvino`` (float32, its export cached under ``--cache-dir``) prints torch's answer."""
    pytest.importorskip("openvino")
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(img)
    answers = []
    for runtime in ("torch", "openvino"):
        assert main(["--checkpoint", str(tiny_checkpoint), "--image", str(img), "--concepts", "cat,dog",
                     "--score-threshold", "0", "--device", "cpu", "--dtype", "float32", "--runtime", runtime,
                     "--cache-dir", str(tmp_path / "cache")]) == 0
        answers.append(SegmentResponse.model_validate_json(capsys.readouterr().out))
    assert (tmp_path / "cache" / "openvino").is_dir()
    torch_answer, ov_answer = (a.model_dump(exclude={"timings"}) for a in answers)
    assert torch_answer["semantic"] == ov_answer["semantic"]
    assert [(i["concept"], i["bbox"], i["segmentation"]) for i in torch_answer["instances"]] == \
           [(i["concept"], i["bbox"], i["segmentation"]) for i in ov_answer["instances"]]
    assert [i["score"] for i in torch_answer["instances"]] == pytest.approx(
        [i["score"] for i in ov_answer["instances"]], abs=1e-5)
