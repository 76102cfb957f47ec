"""``python -m model.evaluate``: COCO mask AP and mIoU of a checkpoint on a dataset.

The command keeps its name; the code lives in ``model.training.evaluation`` (this parser: ``.command``).
"""

from __future__ import annotations

import logging

from model.training.command import run_main
from model.training.evaluation.command import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_main(main)
