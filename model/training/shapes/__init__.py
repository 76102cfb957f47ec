"""The shapes world: a procedurally rendered domain where the whole ZUTIS method runs end to end on a CPU.

No pretrained CLIP or image datasets exist on the machines this project runs on, so this package builds a small
world with ground truth instead: 64 concepts ("<colour> <shape>", 8 x 8) drawn on textured backgrounds.

- ``world``: concepts, the seen/unseen split, scenes (``render_scene``, visible masks) and captions.
- ``drawing``: the drawing primitives: shape polygons, ``draw_shape``, textured backgrounds.
- ``dataset``: writing an unlabelled image index (with a hidden ground-truth sidecar) and evaluation scenes
  (COCO instances JSON + label PNGs) to disk.
- ``oracle``: training scenes with their true masks and labels, and relabelled evaluation scenes (ladder R0 / R2).
- ``clip_pretrain``: contrastive pre-training of a tiny open_clip CLIP on caption-paired renders, this world's
  stand-in for OpenAI CLIP (``python -m model.shapes.clip_pretrain``); its recipe (``clip_recipe``), losses
  (``clip_losses``) and caption stream (``clip_data``) in modules of their own.
- ``zero_shot``: the CLIP's zero-shot and token-probe measurements.

Importing the package is cheap: nothing is imported from the submodules here.
"""
