"""``python -m model.shapes.clip_pretrain``: pre-train the shapes world's tiny CLIP (the command keeps its name;
the code lives in ``model.training.shapes.clip_pretrain``)."""

from __future__ import annotations

from model.training.shapes.clip_pretrain import main

if __name__ == "__main__":
    main()
