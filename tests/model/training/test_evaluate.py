"""Tests for model/training/evaluation: COCO mask AP against hand-derived values, the confusion matrix against a naive
per-class loop, datasets on disk, the predictor loop (with an oracle stand-in) and the command line."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.training.evaluation.coco_ap import evaluate_instances
from model.training.evaluation.command import main
from model.training.evaluation.datasets import load_coco_dataset, load_label_folder_dataset, load_label_map, read_image
from model.training.evaluation.runner import ProgressReporter, evaluate_predictor
from model.training.evaluation.semantic import ConfusionMatrix, evaluate_semantic

H, W = 40, 50
# COCO's 101-point interpolated AP when precision is 1 up to recall 0.5 and 0 after: 51 of 101 recall thresholds.
HALF_RECALL_AP = 100 * 51 / 101


def box_mask(y0: int, x0: int, y1: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def rle(mask: np.ndarray, as_bytes: bool = False) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = encoded["counts"] if as_bytes else encoded["counts"].decode()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def coco_gt(objects: list[tuple[int, int, np.ndarray]], num_images: int = 1) -> dict:
    """objects: (image_id, category_id, mask). Categories 'cat' (id 3) and 'dog' (id 7): ids are not contiguous."""
    return {
        "images": [{"id": i, "file_name": f"img{i}.png", "height": H, "width": W} for i in range(1, num_images + 1)],
        "annotations": [{"id": k + 1, "image_id": img, "category_id": cat, "segmentation": rle(m),
                         "area": int(m.sum()), "iscrowd": 0} for k, (img, cat, m) in enumerate(objects)],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


def result(image_id: int, category_id: int, mask: np.ndarray, score: float, as_bytes: bool = False) -> dict:
    return {"image_id": image_id, "category_id": category_id, "segmentation": rle(mask, as_bytes), "score": score}


A, B, C = box_mask(0, 0, 10, 10), box_mask(20, 20, 30, 40), box_mask(5, 30, 15, 45)


# ---------------------------------------------------------------------------------------------------------------
# Instance AP
# ---------------------------------------------------------------------------------------------------------------
def test_evaluate_instances_perfect_predictions_give_100():
    gt = coco_gt([(1, 3, A), (1, 7, B), (2, 3, C)], num_images=2)
    results = [result(1, 3, A, 0.9), result(1, 7, B, 0.8, as_bytes=True), result(2, 3, C, 0.7)]
    report = evaluate_instances(gt, results)
    assert report["AP"] == pytest.approx(100) and report["AP50"] == pytest.approx(100)
    assert report["AP75"] == pytest.approx(100)
    assert report["per_category"][3]["AP"] == pytest.approx(100) and report["per_category"][7]["num_gt"] == 1
    assert report["num_gt"] == 3 and report["num_results"] == 3 and report["num_images"] == 2
    assert report["APl"] is None  # no object is large (>96^2 px): undefined, not 0


def test_evaluate_instances_polygon_gt_without_area():
    gt = coco_gt([], num_images=1)
    polygon = [[2, 3, 20, 3, 20, 15, 2, 15]]
    gt["annotations"] = [{"image_id": 1, "category_id": 3, "segmentation": polygon}]  # no id, area, iscrowd
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))).astype(bool)
    assert evaluate_instances(gt, [result(1, 3, mask, 0.5)])["AP"] == pytest.approx(100)


def test_evaluate_instances_half_the_objects_found():
    gt = coco_gt([(1, 3, A), (1, 3, B)])
    report = evaluate_instances(gt, [result(1, 3, A, 0.9)])
    for key in ("AP", "AP50", "AP75"):
        assert report[key] == pytest.approx(HALF_RECALL_AP)


def test_evaluate_instances_iou_062_counts_at_50_not_75():
    partial = box_mask(0, 0, 10, 6)  # 60 of A's 100 pixels
    partial[9, 6:8] = True  # + 2 more inside A: IoU 0.62, clear of the 0.60 threshold's float rounding
    assert mask_utils.iou([rle(partial)], [rle(A)], [0])[0, 0] == pytest.approx(0.62)
    report = evaluate_instances(coco_gt([(1, 3, A)]), [result(1, 3, partial, 0.9)])
    assert report["AP50"] == pytest.approx(100) and report["AP75"] == pytest.approx(0)
    assert report["AP"] == pytest.approx(30)  # matched at IoU 0.50, 0.55, 0.60 of the 10 thresholds


def test_evaluate_instances_false_positive_ranked_first_halves_precision():
    report = evaluate_instances(coco_gt([(1, 3, A)]), [result(1, 3, B, 0.9), result(1, 3, A, 0.5)])
    assert report["AP"] == pytest.approx(50)  # recall 1 reached at precision 1/2


def test_evaluate_instances_wrong_category_counts_only_class_agnostic():
    gt, results = coco_gt([(1, 3, A)]), [result(1, 7, A, 0.9)]
    assert evaluate_instances(gt, results)["AP"] == pytest.approx(0)
    agnostic = evaluate_instances(gt, results, class_agnostic=True)
    assert agnostic["AP"] == pytest.approx(100) and list(agnostic["per_category"]) == [1]


def test_evaluate_instances_category_subsets():
    gt = coco_gt([(1, 3, A), (1, 7, B)])
    results = [result(1, 3, A, 0.9), result(1, 3, C, 0.8)]  # the dog is missed; C is a false 'cat'
    assert evaluate_instances(gt, results, category_ids=[3])["AP"] == pytest.approx(100)
    assert evaluate_instances(gt, results, category_ids=[7])["AP"] == pytest.approx(0)
    assert evaluate_instances(gt, results)["AP"] == pytest.approx(50)
    # Class-agnostic subsets drop other categories' GT and results first: only the dog GT remains.
    assert evaluate_instances(gt, results, class_agnostic=True, category_ids=[7])["AP"] == pytest.approx(0)
    # ... or only the cat GT and both cat results (C ranked below A, so precision stays 1 up to full recall).
    assert evaluate_instances(gt, results, class_agnostic=True, category_ids=[3])["AP"] == pytest.approx(100)
    # All together, class-agnostic: A matches, C (0.8) is a false positive before nothing else: recall 1/2.
    assert evaluate_instances(gt, results, class_agnostic=True)["AP"] == pytest.approx(HALF_RECALL_AP)


def test_evaluate_instances_image_subset():
    gt = coco_gt([(1, 3, A), (2, 3, B)], num_images=2)
    results = [result(1, 3, A, 0.9)]
    assert evaluate_instances(gt, results)["AP"] == pytest.approx(HALF_RECALL_AP)
    assert evaluate_instances(gt, results, image_ids=[1])["AP"] == pytest.approx(100)


def test_evaluate_instances_empty_results():
    report = evaluate_instances(coco_gt([(1, 3, A)]), [])
    assert report["AP"] == 0 and report["AP50"] == 0 and report["num_results"] == 0
    assert evaluate_instances(coco_gt([]), [])["AP"] is None  # nothing to find: undefined


def test_evaluate_instances_reads_json_file(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco_gt([(1, 3, A)])))
    assert evaluate_instances(path, [result(1, 3, A, 0.9)])["AP"] == pytest.approx(100)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_instances(tmp_path / "missing.json", [])


@pytest.mark.parametrize("bad, message", [
    ({"image_id": 9, "category_id": 3, "segmentation": rle(A), "score": 1}, "image_id 9"),
    ({"image_id": 1, "category_id": 5, "segmentation": rle(A), "score": 1}, "category_id 5"),
    ({"image_id": 1, "category_id": 3, "segmentation": rle(A)}, "lacks 'score'"),
    ({"image_id": 1, "category_id": 3, "segmentation": [[0, 0, 1, 1, 1, 0]], "score": 1}, "compressed RLE"),
    ({"image_id": 1, "category_id": 3, "segmentation": rle(box_mask(0, 0, 2, 2, 8, 8)), "score": 1}, "differs"),
])
def test_evaluate_instances_rejects_bad_results(bad, message):
    with pytest.raises(ValueError, match=message):
        evaluate_instances(coco_gt([(1, 3, A)]), [bad])


def test_evaluate_instances_rejects_unknown_category_subset():
    with pytest.raises(ValueError, match="not categories"):
        evaluate_instances(coco_gt([(1, 3, A)]), [], category_ids=[4])


# ---------------------------------------------------------------------------------------------------------------
# Semantic metrics
# ---------------------------------------------------------------------------------------------------------------
def test_confusion_matrix_hand_example():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 2 -> 1/2; class 2: FN 1 -> 0; class 3 absent -> NaN
    iou = cm.per_class_iou()
    np.testing.assert_allclose(iou[:3], [0.5, 0.5, 0.0])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx(1 / 3)
    assert cm.miou([1, 2]) == pytest.approx(0.25)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def naive_per_class_iou(preds, gts, num_classes, ignore_index):
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
        for c in range(num_classes):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    return np.array([i / u if u else np.nan for i, u in zip(inter, union)])


def test_confusion_matrix_matches_naive_loop_on_random_maps():
    rng = np.random.default_rng(0)
    num_classes = 7
    preds = [rng.integers(0, num_classes - 1, size=(13, 17)) for _ in range(4)]  # class 6 is never predicted ...
    gts = [rng.choice([0, 1, 2, 3, 4, 255, 300, -1], size=(13, 17)) for _ in range(4)]  # ... nor in the GT; 5 is FP
    cm = ConfusionMatrix(num_classes)
    for pred, gt in zip(preds, gts):
        cm.update(torch.from_numpy(pred).to(torch.int32), gt.astype(np.int64))
    expected = naive_per_class_iou(preds, gts, num_classes, 255)
    np.testing.assert_allclose(cm.per_class_iou(), expected, equal_nan=True)
    assert math.isnan(expected[6]) and expected[5] == 0
    assert cm.miou() == pytest.approx(np.nanmean(expected))
    valid = np.concatenate([((g >= 0) & (g < num_classes)).ravel() for g in gts])
    correct = np.concatenate([(p == g).ravel() for p, g in zip(preds, gts)])
    assert cm.pixel_accuracy() == pytest.approx(correct[valid].mean())


def test_confusion_matrix_ignores_gt_outside_range_and_ignore_index():
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(np.array([2, 2, 1, 1]), np.array([0, 255, 1, 2]))  # the first two pixels are ignored
    assert cm.matrix.sum() == 2 and cm.matrix[1, 1] == 1 and cm.matrix[2, 1] == 1


def test_confusion_matrix_empty_and_bad_input():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    cm.update(np.array([9]), np.array([255]))  # out-of-range prediction on an ignored pixel is fine
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(np.array([3]), np.array([1]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.array([0.5]), np.array([1]))


def test_evaluate_semantic_subset_and_percentages():
    gt = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [1, 1, 0]], dtype=np.uint16)
    report = evaluate_semantic([(pred, gt)], num_classes=4)
    assert report["mIoU"] == pytest.approx(100 / 3) and report["pixel_accuracy"] == pytest.approx(60)
    assert report["per_class_iou"][3] is None and report["num_pixels"] == 5
    assert evaluate_semantic([(pred, gt)], 4, class_ids=[2])["mIoU"] == pytest.approx(0)


# ---------------------------------------------------------------------------------------------------------------
# Datasets on disk, the predictor loop and the command line
# ---------------------------------------------------------------------------------------------------------------
OBJECTS = [(1, 3, A), (1, 7, B), (2, 7, C)]  # (image id, category id, mask)
CLASS_OF_CATEGORY = {3: 1, 7: 2}  # semantic class index: categories sorted by id


def write_dataset(root: Path) -> dict:
    """Two images with a COCO JSON and label PNGs: image 1's named by file stem, image 2's by id."""
    gt = coco_gt(OBJECTS, num_images=2)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for img in gt["images"]:
        Image.new("RGB", (W, H), (img["id"] * 40, 0, 0)).save(root / "images" / img["file_name"])
        label = np.zeros((H, W), dtype=np.uint8)
        for image_id, cat, mask in OBJECTS:
            if image_id == img["id"]:
                label[mask] = CLASS_OF_CATEGORY[cat]
        label[-1, :] = 255
        name = f"img{img['id']}.png" if img["id"] == 1 else f"{img['id']}.png"
        Image.fromarray(label).save(root / "labels" / name)
    (root / "gt.json").write_text(json.dumps(gt))
    return gt


class OraclePredictor:
    """Answers with the GT of each image (identified by its red level), matching concepts by name."""

    def __init__(self, names_by_category: dict[int, str], drop_category: int | None = None):
        self.names = names_by_category
        self.drop = drop_category

    def predict(self, images, concepts, **overrides):
        out = []
        for image in images:
            image_id = image.getpixel((0, 0))[0] // 40
            vocab = ["background", *concepts]
            semantic = np.zeros((image.height, image.width), dtype=np.uint16)
            instances = []
            for img, cat, mask in OBJECTS:
                name = self.names[cat]
                if img != image_id or name not in concepts or cat == self.drop:
                    continue
                k = vocab.index(name)
                semantic[mask] = k
                instances.append(SimpleNamespace(concept_index=k, concept=name, score=0.9, bbox_xywh=[0, 0, 1, 1],
                                                 area=int(mask.sum()), segmentation=rle(mask)))
            out.append(SimpleNamespace(image_hw=(image.height, image.width), concepts=vocab,
                                       instances=instances, semantic=semantic))
        return out


def test_load_coco_dataset_finds_images_and_labels(tmp_path):
    write_dataset(tmp_path)
    dataset = load_coco_dataset(tmp_path / "gt.json", tmp_path / "images", tmp_path / "labels")
    assert dataset.class_names == ("cat", "dog") and dataset.category_ids == (3, 7)
    image_id, image_path, annotations, label_path = dataset.samples[1]
    assert image_id == 2 and image_path.name == "img2.png" and label_path.name == "2.png"
    assert [a["category_id"] for a in annotations] == [7]
    label = load_label_map(label_path)
    assert label.shape == (H, W) and label[C].tolist() == [2] * int(C.sum()) and (label[-1] == 255).all()
    (tmp_path / "labels" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match="2.png"):
        load_coco_dataset(tmp_path / "gt.json", tmp_path / "images", tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_coco_dataset(tmp_path / "gt.json", tmp_path / "nowhere")


def test_load_label_map_rejects_rgb(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel"):
        load_label_map(tmp_path / "rgb.png")


def test_evaluate_predictor_with_oracle_scores_100(tmp_path):
    write_dataset(tmp_path)
    dataset = load_coco_dataset(tmp_path / "gt.json", tmp_path / "images", tmp_path / "labels")
    # Vocabulary in reverse dataset order: the concept -> category / class mapping must follow names, not positions.
    evaluation = evaluate_predictor(OraclePredictor({3: "cat", 7: "dog"}), dataset, ["dog", "cat"], batch_size=2,
                                    subsets={"unseen": ["dog"]})
    report = evaluation.report
    assert report["instances"]["AP"] == pytest.approx(100) and report["semantic"]["mIoU"] == pytest.approx(100)
    assert report["subsets"]["unseen"]["instances"]["AP"] == pytest.approx(100)
    assert report["subsets"]["unseen"]["semantic"]["class_ids"] == [2]
    assert sorted(r["category_id"] for r in evaluation.results) == [3, 7, 7]
    json.dumps(report)  # JSON-ready


def test_evaluate_predictor_missed_category(tmp_path):
    write_dataset(tmp_path)
    dataset = load_coco_dataset(tmp_path / "gt.json", tmp_path / "images", tmp_path / "labels")
    report = evaluate_predictor(OraclePredictor({3: "cat", 7: "dog"}, drop_category=7), dataset,
                                subsets={"seen": ["cat"], "unseen": ["dog"]}).report
    assert report["subsets"]["seen"]["instances"]["AP"] == pytest.approx(100)
    assert report["subsets"]["unseen"]["instances"]["AP"] == pytest.approx(0)
    assert report["instances"]["AP"] == pytest.approx(50)
    assert report["subsets"]["unseen"]["semantic"]["mIoU"] == pytest.approx(0)
    # background IoU: its GT pixels (all but the objects and the ignored last row) / those plus the missed dogs
    background = 2 * (H - 1) * W - A.sum() - C.sum() - B.sum()
    assert report["semantic"]["per_class_iou"][0] == pytest.approx(100 * background / (background + B.sum() + C.sum()))


def test_evaluate_predictor_label_folder_and_bad_concepts(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "labels" / "2.png").rename(tmp_path / "labels" / "img2.png")
    dataset = load_label_folder_dataset(tmp_path / "images", tmp_path / "labels", ["cat", "dog"])
    assert [s.image_id for s in dataset] == ["img1", "img2"]
    report = evaluate_predictor(OraclePredictor({3: "cat", 7: "dog"}), dataset).report
    assert report["instances"] is None and report["semantic"]["mIoU"] == pytest.approx(100)
    with pytest.raises(ValueError, match="horse"):
        evaluate_predictor(OraclePredictor({}), dataset, ["horse"])


def test_cli_scores_results_file(tmp_path, capsys):
    gt = coco_gt([(1, 3, A), (1, 7, B)])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([result(1, 3, A, 0.9)]))
    out = tmp_path / "report.json"
    assert main(["--results", str(tmp_path / "res.json"), "--coco", str(tmp_path / "gt.json"),
                 "--subset", "unseen=dog", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["instances"]["AP"] == pytest.approx(50) and report["subsets"]["unseen"]["instances"]["AP"] == 0
    table = capsys.readouterr().out
    assert "mask AP" in table and "unseen" in table and "mIoU" not in table


def test_cli_missing_checkpoint_is_named(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        main(["--checkpoint", str(tmp_path / "nope.safetensors"), "--coco", str(tmp_path / "gt.json"),
              "--images", str(tmp_path / "images")])


def test_evaluate_predictor_rejects_missing_semantic_map(tmp_path):
    write_dataset(tmp_path)
    dataset = load_coco_dataset(tmp_path / "gt.json", tmp_path / "images", tmp_path / "labels")

    class NoSemantic(OraclePredictor):
        def predict(self, images, concepts, **overrides):
            return [SimpleNamespace(**{**vars(p), "semantic": None}) for p in super().predict(images, concepts)]

    with pytest.raises(ValueError, match="no semantic map"):
        evaluate_predictor(NoSemantic({3: "cat", 7: "dog"}), dataset)
    # without label maps, instance-only predictions are fine
    no_labels = load_coco_dataset(tmp_path / "gt.json", tmp_path / "images")
    assert evaluate_predictor(NoSemantic({3: "cat", 7: "dog"}), no_labels).report["instances"]["AP"] == \
        pytest.approx(100)


def test_evaluation_reads_photos_upright_and_checks_the_annotated_size(tmp_path):
    gt = write_dataset(tmp_path)
    assert H != W
    exif = Image.Exif()
    exif[0x0112] = 6  # stored W x H, seen H x W
    path = tmp_path / "images" / gt["images"][0]["file_name"]
    Image.open(path).save(path, exif=exif.tobytes())
    assert read_image(path).size == (H, W)
    assert read_image(path, exif_orientation=False).size == (W, H)
    dataset = load_coco_dataset(tmp_path / "gt.json", tmp_path / "images", tmp_path / "labels")
    with pytest.raises(ValueError, match="COCO entry says .*--no-exif-orientation"):
        evaluate_predictor(OraclePredictor({3: "cat", 7: "dog"}), dataset)
    report = evaluate_predictor(OraclePredictor({3: "cat", 7: "dog"}), dataset, exif_orientation=False).report
    assert report["instances"]["AP"] == pytest.approx(100)


def test_progress_is_written_as_lines_when_not_on_a_terminal(tmp_path, capsys):
    write_dataset(tmp_path)
    dataset = load_coco_dataset(tmp_path / "gt.json", tmp_path / "images", tmp_path / "labels")
    evaluate_predictor(OraclePredictor({3: "cat", 7: "dog"}), dataset, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if "images" in line]
    assert [line.split(" ")[0] for line in lines] == ["1/2", "2/2"], err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    report = ProgressReporter(3, terminal)
    for done in (1, 2, 3):
        report(done)
    report.close()
    assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().endswith("\n")


def test_cli_passes_geometry_and_input_size_to_the_predictor(tmp_path, tiny_checkpoint, monkeypatch):
    from model.predictor import Predictor

    write_dataset(tmp_path)
    seen = []
    original = Predictor.from_checkpoint.__func__

    def recording(cls, *args, **kwargs):
        predictor = original(cls, *args, **kwargs)
        seen.append((predictor.geometry, predictor.input_size))
        return predictor

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(recording))
    out = tmp_path / "report.json"
    assert main(["--checkpoint", str(tiny_checkpoint), "--coco", str(tmp_path / "gt.json"), "--images",
                 str(tmp_path / "images"), "--geometry", "native", "--input-size", "48", "--out", str(out)]) == 0
    assert seen == [("native", 48)]
    assert json.loads(out.read_text())["num_images"] == 2
