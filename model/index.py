"""``python -m model.index``: embed image folders with a CLIP image tower (the unlabelled index).

The command keeps its name; the code lives in ``model.training.index``.
"""

from __future__ import annotations

from model.training.command import run_main
from model.training.index import main

if __name__ == "__main__":
    run_main(main)
