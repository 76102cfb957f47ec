"""Evaluation: COCO mask AP (pycocotools ``COCOeval``, ``iouType="segm"``) and semantic mIoU / pixel accuracy.

Metrics follow the official ZUTIS evaluation (reference §6.1):

- instances: category-aware ``COCOeval`` on masks with maxDets [1, 10, 100]; AP, AP50, AP75 reported as
  percentages (0-100). ``class_agnostic=True`` maps every category, in GT and results alike, to one.
- semantic: one confusion matrix accumulated over the whole split; GT labels outside ``[0, num_classes)`` (255,
  1000, ...) are ignored; mIoU is the nanmean over classes of TP / (TP + FP + FN), classes absent from both GT and
  prediction being NaN and excluded; background (class 0) counts as a class.

Report values that are undefined (no GT for that metric) are ``None``. The modules, each importable on its own:

- ``coco_ap``: COCO mask AP of a results list against a COCO dataset (``evaluate_instances``, ``load_coco_json``).
- ``semantic``: the confusion matrix and its mIoU / pixel-accuracy report (``ConfusionMatrix``, ``semantic_report``).
- ``datasets``: evaluation datasets on disk, COCO JSON or label-PNG folder (``EvalDataset``, ``load_*``).
- ``runner``: running a predictor over a dataset and scoring it into the report (``evaluate_checkpoint``, ``score``).
- ``command``: ``python -m model.evaluate`` (the entry module is ``model/evaluate.py``).
- ``percent``: the report's unit, a fraction as a percentage with undefined as None.

The score floor a service answer is cut at (greedy matching at IoU 0.5, F1) is ``model.training.operating_point``.
Importing the package is cheap: nothing is imported from the submodules here.
"""
