"""``python -m model.pseudo_mask``: label-free salient-object pseudo-masks for retrieved images.

The command keeps its name; the code lives in ``model.training.pseudo_masks``.
"""

from __future__ import annotations

from model.training.command import run_main
from model.training.pseudo_masks.command import main

if __name__ == "__main__":
    run_main(main)
