"""Training-data stage 3: one label-free salient-object mask per image, by spectral-cluster voting (§5.4).

This module is the command line of ``python -m model.pseudo_mask`` (entry point ``model/pseudo_mask.py``): it
reads the images of a retrieval file or of image folders, builds the chosen feature extractors
(``model.training.pseudo_masks.features``) and runs the stage (``model.training.pseudo_masks.shards``).
The first docstring line is the command's ``--help`` description.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from model.clip_weights import load_clip
from model.config import ModelConfig
from model.training.index import list_images
from model.training.pseudo_masks.features import EXTRACTOR_NAMES, build_extractors
from model.training.pseudo_masks.shards import generate_pseudo_masks, load_pseudo_masks
from model.training.retrieve import load_retrieval


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit status (0).

    A missing weights file raises ``FileNotFoundError`` and a bad extractor choice ``ValueError`` before any
    image is read (``model.training.command.run_main`` turns both into one line).
    """
    parser = argparse.ArgumentParser(prog="python -m model.pseudo_mask", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--retrieval", type=Path, help="retrieval.json (or its directory) from model.retrieve")
    source.add_argument("--images", nargs="+", type=Path, help="image folders (recursive)")
    parser.add_argument("--out", required=True, type=Path, help="pseudo-mask directory (reruns resume)")
    parser.add_argument("--extractors", default="colour",
                        help=f"comma-separated, from {', '.join(EXTRACTOR_NAMES)} (default: colour)")
    parser.add_argument("--clip", type=Path, help="CLIP weights for the clip extractor")
    parser.add_argument("--clip-arch", default=None, help="open_clip architecture when --clip is not ours")
    parser.add_argument("--dino", type=Path, help="DINO ViT-S/16 weights (e.g. dino_deitsmall16_pretrain.pth)")
    parser.add_argument("--moco", type=Path, help="MoCo-v2 ResNet-50 weights (e.g. moco_v2_800ep_pretrain.pth.tar)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    names = [n.strip() for n in args.extractors.split(",") if n.strip()]
    for flag, path in (("--clip", args.clip), ("--dino", args.dino), ("--moco", args.moco)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag} weights file not found: {path}")
    if args.retrieval is not None:
        paths = [p for ps in load_retrieval(args.retrieval).values() for p in ps]
    else:
        paths = list_images(args.images)
    clip_visual = None
    if "clip" in names and args.clip is not None:
        config = ModelConfig(clip_model=args.clip_arch) if args.clip_arch else None
        clip_visual = load_clip(args.clip, config).visual.to(args.device)
    extractors = build_extractors(names, clip_visual, args.dino, args.moco, args.device)
    out = generate_pseudo_masks(paths, extractors, args.out, shard_size=args.shard_size,
                                progress=not args.no_progress)
    print(f"{len(load_pseudo_masks(out))} pseudo-masks in {out}")
    return 0


__all__ = ["main"]
