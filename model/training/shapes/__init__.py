"""The shapes world: a procedurally rendered domain where the whole ZUTIS method runs end to end on a CPU.

No pretrained CLIP or image datasets exist on the machines this project runs on, so this package builds a small
world with ground truth instead: 64 concepts ("<colour> <shape>", 8 x 8) drawn on textured backgrounds.

- ``world``: concepts, the seen/unseen split, the scene renderer and captions.
- ``dataset``: writing an unlabelled image index (with a hidden ground-truth sidecar) and evaluation scenes
  (COCO instances JSON + label PNGs) to disk.
- ``clip_pretrain``: contrastive pre-training of a tiny open_clip CLIP on caption-paired renders, this world's
  stand-in for OpenAI CLIP (``python -m model.shapes.clip_pretrain``).

Importing the package is cheap: nothing is imported from the submodules here.
"""
