"""``zutis-client segment`` as a real command against a real service: JSON, COCO results that pycocotools scores,
overlays, concurrency, the progress bar, failures per image, and the URL and key from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.live_service import REPO_ROOT

pytestmark = pytest.mark.integration

EXAMPLES_DIR = REPO_ROOT / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("shapes-*.png"))
CONCEPTS = ["red circle", "blue star", "green heart"]


def zutis_client(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run the installed console script (beside the interpreter, as pip puts it in a virtualenv)."""
    script = Path(sys.executable).parent / "zutis-client"
    assert script.exists(), f"{script} missing: pip install -e './client[coco]'"
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZUTIS_")}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300,
                          env={**base, **(env or {})}, cwd=cwd)


def direct_instances(url: str, image: Path) -> list[dict]:
    answer = httpx.post(f"{url}/segment", files={"image": image.open("rb")}, data={"concepts": CONCEPTS}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["instances"]


def test_segment_folder_to_json_with_overlays(live_url, tmp_path):
    out, overlays = tmp_path / "results.json", tmp_path / "overlays"
    done = zutis_client("--url", live_url, "segment", str(EXAMPLES_DIR), "--concepts", "red circle, blue star",
                        "green heart", "--out", str(out), "--overlay-dir", str(overlays), "--concurrency", "3")
    assert done.returncode == 0, done.stderr
    assert "3/3" in done.stderr, "the progress bar reaches the end"
    written = json.loads(out.read_text())
    assert written["concepts"] == CONCEPTS
    assert [r["image"] for r in written["results"]] == [str(p) for p in EXAMPLES]
    for record, path in zip(written["results"], EXAMPLES):
        assert record["answer"]["instances"] == direct_instances(live_url, path)
        drawn = Image.open(overlays / f"{path.stem}.png")
        assert drawn.size == Image.open(path).size
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(Image.open(path).convert("RGB")))


def test_coco_results_are_scored_by_pycocotools(live_url, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # Ground truth made of the service's own answers, under ids unlike the defaults: a perfect score proves that
    # image and category ids are taken from the ground-truth file, and that the file is in COCO's results format.
    category_ids = {name: 10 + k for k, name in enumerate(CONCEPTS)}
    images, annotations = [], []
    for n, path in enumerate(EXAMPLES):
        image_id = 100 + 7 * n
        images.append({"id": image_id, "file_name": path.name, "width": 128, "height": 128})
        for instance in direct_instances(live_url, path):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": category_ids[instance["concept"]], "area": instance["area"],
                                "bbox": instance["bbox"], "segmentation": instance["segmentation"]})
    assert annotations
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": i, "name": name.upper()} for name, i in category_ids.items()]}))

    results = tmp_path / "coco.json"
    done = zutis_client("--url", live_url, "segment", *map(str, EXAMPLES), "--concepts", *CONCEPTS,
                        "--coco-results", "--coco-gt", str(gt_file), "--out", str(results), "--no-progress")
    assert done.returncode == 0, done.stderr
    detections = json.loads(results.read_text())
    assert len(detections) == len(annotations)
    assert {d["image_id"] for d in detections} == {i["id"] for i in images}

    gt = COCO(str(gt_file))
    evaluation = COCOeval(gt, gt.loadRes(str(results)), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0), "AP of the answers against themselves"

    # Without a ground-truth file: images 1..N in input order, categories 1..K in concept order.
    done = zutis_client("--url", live_url, "segment", str(EXAMPLES[0]), "--concepts", *CONCEPTS, "--coco-results",
                        "--no-progress")
    assert done.returncode == 0, done.stderr
    plain = json.loads(done.stdout)
    assert {d["image_id"] for d in plain} == {1}
    assert [d["category_id"] for d in plain] == [1 + CONCEPTS.index(i["concept"])
                                                 for i in direct_instances(live_url, EXAMPLES[0])]


def test_a_failed_image_is_reported_and_the_others_written(live_url, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    done = zutis_client("segment", str(EXAMPLES[0]), str(broken), "--concepts", "red circle", "--no-progress",
                        env={"ZUTIS_URL": live_url})
    assert done.returncode == 1
    records = json.loads(done.stdout)["results"]
    assert "answer" in records[0]
    assert records[1]["error"]["type"] in ("invalid_image", "unsupported_media_type")
    assert "broken.png" in done.stderr and "1 of 2 image(s) answered" in done.stderr


def test_an_overlay_that_cannot_be_written_keeps_the_answer_and_says_why(live_url, tmp_path):
    overlays = tmp_path / "overlays"
    (overlays / f"{EXAMPLES[0].stem}.png").mkdir(parents=True)  # a folder where the overlay file would go
    done = zutis_client("segment", str(EXAMPLES[0]), "--concepts", "red circle", "--no-progress",
                        "--overlay-dir", str(overlays), env={"ZUTIS_URL": live_url})
    assert done.returncode == 1
    [record] = json.loads(done.stdout)["results"]
    assert "answer" in record  # the answer is kept
    assert record["error"]["message"].startswith("answered, but the overlay was not written: IsADirectoryError")
    assert "cannot read" not in record["error"]["message"]  # not reported as the input being unreadable


def test_api_key_from_the_environment(serve, tmp_path):
    url, _ = serve(api_key="k3y")
    ok = zutis_client("segment", str(EXAMPLES[0]), "--concepts", "cat", "--no-progress",
                      env={"ZUTIS_URL": url, "ZUTIS_API_KEY": "k3y"})
    assert ok.returncode == 0, ok.stderr
    refused = zutis_client("--url", url, "--api-key", "wrong", "segment", str(EXAMPLES[0]), "--concepts", "cat",
                           "--no-progress")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["results"][0]["error"]["type"] == "unauthorized"


def test_bad_arguments_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert zutis_client("segment", str(empty), "--concepts", "cat").returncode == 2
    missing = zutis_client("segment", str(tmp_path / "nowhere.png"), "--concepts", "cat")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    assert zutis_client("segment", str(EXAMPLES[0]), "--concepts", " , ").returncode == 2
    assert zutis_client("segment", str(EXAMPLES[0])).returncode == 2
    lone_gt = zutis_client("segment", str(EXAMPLES[0]), "--concepts", "cat", "--coco-gt", str(EXAMPLES[0]))
    assert lone_gt.returncode == 2 and "--coco-results" in lone_gt.stderr
    unknown = tmp_path / "gt.json"
    unknown.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "dog"}]}')
    wrong_gt = zutis_client("segment", str(EXAMPLES[0]), "--concepts", "cat", "--coco-results", "--coco-gt",
                            str(unknown))
    assert wrong_gt.returncode == 2 and "not categories" in wrong_gt.stderr


def phone_photo(source: Path, orientation: int, size: tuple[int, int]) -> bytes:
    """``source`` resized to ``size`` (the stored grid) as a JPEG with EXIF orientation ``orientation``."""
    import io

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.open(source).convert("RGB").resize(size).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_mixed_folder_keeps_every_record_with_its_own_cause(live_url, tmp_path):
    folder, out, overlays = tmp_path / "photos", tmp_path / "run" / "results.json", tmp_path / "overlays"
    folder.mkdir()
    (folder / "a-good.png").write_bytes(EXAMPLES[0].read_bytes())
    (folder / "b-turned-6.jpg").write_bytes(phone_photo(EXAMPLES[1], 6, (160, 96)))  # upright: 96 x 160
    (folder / "c-turned-3.jpg").write_bytes(phone_photo(EXAMPLES[2], 3, (120, 80)))  # upright: 120 x 80
    (folder / "d-turned-8.jpg").write_bytes(phone_photo(EXAMPLES[0], 8, (64, 112)))  # upright: 112 x 64
    (folder / "e-broken.jpg").write_bytes(phone_photo(EXAMPLES[1], 6, (160, 96))[:400])  # cut short
    (folder / "f-not-an-image.png").write_text("a text file with an image's name\n")
    (folder / "g-good.png").write_bytes(EXAMPLES[1].read_bytes())
    out.parent.mkdir()
    out.write_text("the previous run's file\n")

    done = zutis_client("--url", live_url, "segment", str(folder), "--concepts", "red circle", "blue star",
                        "--out", str(out), "--overlay-dir", str(overlays), "--concurrency", "4", "--no-progress")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"], "no temporary file left behind"
    records = json.loads(out.read_text())["results"]
    names = sorted(p.name for p in folder.iterdir())
    assert [Path(r["image"]).name for r in records] == names, "one record per image, in order"
    by_name = {Path(r["image"]).name: r for r in records}
    upright = {"a-good.png": (128, 128), "b-turned-6.jpg": (96, 160), "c-turned-3.jpg": (120, 80),
               "d-turned-8.jpg": (112, 64), "g-good.png": (128, 128)}
    for name, (width, height) in upright.items():
        record = by_name[name]
        assert "error" not in record, record.get("error")
        assert record["answer"]["image"] == {"width": width, "height": height}
        drawn = Image.open(overlays / f"{Path(name).stem}.png")
        assert drawn.size == (width, height), name
    broken, not_image = by_name["e-broken.jpg"]["error"], by_name["f-not-an-image.png"]["error"]
    assert (broken["type"], broken["status"]) == ("invalid_image", 400), broken
    assert (not_image["type"], not_image["status"]) == ("unsupported_media_type", 415), not_image
    assert broken["message"] and not_image["message"]
    assert "connection_error" not in out.read_text() and "connection_error" not in done.stderr
    assert "5 of 7 image(s) answered" in done.stderr
    assert "e-broken.jpg" in done.stderr and "f-not-an-image.png" in done.stderr


def test_turned_photo_overlay_lines_up_with_the_answer(live_url, tmp_path):
    from zutis_client import Client

    photo = tmp_path / "turned.jpg"
    photo.write_bytes(phone_photo(EXAMPLES[0], 6, (160, 96)))
    with Client(live_url) as client:
        result = client.segment(photo, CONCEPTS)
    assert (result.width, result.height) == (96, 160)
    drawn = result.overlay(photo, labels=False)
    assert drawn.size == (96, 160)
    upright = np.asarray(Image.open(photo).convert("RGB").transpose(Image.Transpose.ROTATE_270))
    changed = np.any(np.asarray(drawn) != upright, axis=-1)
    assert changed.any() and np.array_equal(changed, result.masks().any(axis=0) & changed)
