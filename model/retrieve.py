"""``python -m model.retrieve``: the top-n images per concept from an index, by CLIP similarity.

The command keeps its name; the code lives in ``model.training.retrieve``.
"""

from __future__ import annotations

from model.training.command import run_main
from model.training.retrieve import main

if __name__ == "__main__":
    run_main(main)
