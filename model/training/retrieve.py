"""Training-data stage 2: the top-n images of an index per concept, by CLIP text-image similarity (§5.1).

A concept's text embedding is the mean of its L2-normalised prompt-template embeddings, re-normalised. The
similarity to every indexed image (one fp32 matmul per chunk of index rows) is reduced to a running top-n with
``torch.topk``: the index is streamed shard by shard and never sorted or held in memory as a whole. "background"
is never a retrieval concept. Outputs, in the chosen directory:

- ``retrieval.json``: ``{concept: [image paths, best first]}`` (the official format);
- ``retrieval_scores.json``: the matching cosine similarities plus what produced them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.backbone import build_tokenizer
from model.clip_weights import ClipTowers
from model.training.files import write_json_atomic
from model.training.index import (add_clip_arguments, check_clip_file, iter_index_shards, load_clip_from_arguments,
                                  read_manifest, tower_checksum)
from model.training.prompts import PROMPT_TEMPLATES, fill_templates

log = logging.getLogger(__name__)

RETRIEVAL = "retrieval.json"
RETRIEVAL_SCORES = "retrieval_scores.json"


def select_concepts(concepts: Sequence[str]) -> list[str]:
    """Concept names to retrieve for: whitespace-stripped, "background" (any case) and duplicates removed.

    Raises ``ValueError`` for an empty name or when nothing is left.
    """
    selected: list[str] = []
    for concept in concepts:
        name = concept.strip()
        if not name:
            raise ValueError("empty concept name")
        if name.lower() == "background" or name in selected:
            continue
        selected.append(name)
    if not selected:
        raise ValueError("no concepts to retrieve for (\"background\" is never retrieved)")
    return selected


def encode_concepts(concepts: Sequence[str], clip: ClipTowers, templates: Sequence[str] = PROMPT_TEMPLATES,
                    batch_size: int = 256) -> torch.Tensor:
    """Prompt-ensembled text embeddings, float32 ``(C, E)``, unit norm, on the text tower's device.

    Each of the ``C * T`` prompts is embedded with ``clip.text`` and L2-normalised; a concept's ``T`` embeddings
    are averaged and the mean is re-normalised.
    """
    tokenizer = build_tokenizer(clip.config)
    prompts = [p for c in concepts for p in fill_templates(c, templates)]
    device = next(clip.text.parameters()).device
    parts = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            parts.append(F.normalize(clip.text(tokens).float(), dim=-1))
    per_prompt = torch.cat(parts).view(len(concepts), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def top_n(index_dir: str | Path, text_embeddings: torch.Tensor, n: int,
          chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` most similar index rows per text embedding.

    Args:
        index_dir: a finished index (``model.index``).
        text_embeddings: float ``(C, E)`` unit-norm; the matmul runs in fp32 on its device.
        n: rows to keep per concept; capped at the index size ``N``.
        chunk_rows: index rows per matmul (default: about 2**24 similarities per chunk).

    Returns:
        ``(scores, rows)`` on the CPU: float32 ``(C, min(n, N))`` cosine similarities, best first, and int64
        global row numbers (row order of ``load_index``). Equal scores are ordered by row number.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    manifest = read_manifest(index_dir)
    text = text_embeddings.float()
    if text.ndim != 2 or text.shape[1] != manifest["dim"]:
        raise ValueError(f"text embeddings of shape {tuple(text.shape)} do not match the index dim {manifest['dim']}")
    c = text.shape[0]
    chunk_rows = chunk_rows or max(1024, 2 ** 24 // max(c, 1))
    best_scores = torch.empty(c, 0, device=text.device)
    best_rows = torch.empty(c, 0, dtype=torch.int64, device=text.device)
    offset = 0
    for embeddings, _ in iter_index_shards(index_dir):
        for start in range(0, embeddings.shape[0], chunk_rows):
            chunk = torch.from_numpy(np.array(embeddings[start:start + chunk_rows])).to(text.device).float()
            scores = torch.cat([best_scores, text @ chunk.T], dim=1)
            rows = torch.cat([best_rows, torch.arange(offset + start, offset + start + chunk.shape[0],
                                                      device=text.device).expand(c, -1)], dim=1)
            best_scores, picked = torch.topk(scores, min(n, scores.shape[1]), dim=1)
            best_rows = torch.gather(rows, 1, picked)
        offset += embeddings.shape[0]
    # topk's order among equal scores is unspecified: make it (score descending, row ascending).
    scores_np, rows_np = best_scores.cpu().numpy(), best_rows.cpu().numpy()
    order = np.stack([np.lexsort((r, -s)) for s, r in zip(scores_np, rows_np)]) if c else np.zeros((0, 0), int)
    return (torch.from_numpy(np.take_along_axis(scores_np, order, 1)),
            torch.from_numpy(np.take_along_axis(rows_np, order, 1)))


def _paths_of_rows(index_dir: str | Path, rows: torch.Tensor) -> list[list[str]]:
    """Image paths of global index rows ``(C, n)``, reading only the shards' path files (not the embeddings)."""
    index_dir = Path(index_dir)
    wanted = set(rows.flatten().tolist())
    path_of: dict[int, str] = {}
    offset = 0
    for shard in read_manifest(index_dir)["shards"]:
        end = offset + shard["count"]
        if any(offset <= r < end for r in wanted):
            lines = (index_dir / shard["paths"]).read_text().splitlines()
            path_of.update({r: lines[r - offset] for r in wanted if offset <= r < end})
        offset = end
    return [[path_of[r] for r in row] for row in rows.tolist()]


def retrieve(index_dir: str | Path, concepts: Sequence[str], clip: ClipTowers, n: int = 500,
             templates: Sequence[str] = PROMPT_TEMPLATES, out_dir: str | Path | None = None, *,
             chunk_rows: int | None = None, check_model: bool = True) -> dict[str, list[str]]:
    """Top-``n`` image paths of the index per concept, best first (``{concept: [paths]}``).

    ``concepts`` pass through ``select_concepts`` (no "background", no duplicates). With ``check_model`` the CLIP
    vision tower must be the one that built the index (same weight checksum): text and image embeddings from
    different CLIPs are not comparable. An image may be retrieved for several concepts. If ``out_dir`` is given,
    ``retrieval.json`` and ``retrieval_scores.json`` are written there (atomically).
    """
    manifest = read_manifest(index_dir)
    if check_model and tower_checksum(clip.visual) != manifest["model_checksum"]:
        raise ValueError(f"{index_dir} was built with another CLIP (checksum {manifest['model_checksum'][:12]}..., "
                         f"this one is {tower_checksum(clip.visual)[:12]}...); retrieve with the same weights")
    names = select_concepts(concepts)
    text = encode_concepts(names, clip, templates)
    scores, rows = top_n(index_dir, text, n, chunk_rows)
    result = dict(zip(names, _paths_of_rows(index_dir, rows)))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / RETRIEVAL_SCORES, {
            "index_dir": str(Path(index_dir).resolve()), "model_checksum": manifest["model_checksum"],
            "n": n, "templates_sha256": hashlib.sha256("\n".join(templates).encode()).hexdigest(),
            "num_templates": len(templates), "scores": dict(zip(names, scores.tolist()))})
        write_json_atomic(out_dir / RETRIEVAL, result)
    return result


def load_retrieval(path: str | Path) -> dict[str, list[str]]:
    """Read ``retrieval.json`` (pass the file or its directory) as ``{concept: [paths]}``."""
    path = Path(path)
    if path.is_dir():
        path = path / RETRIEVAL
    if not path.is_file():
        raise FileNotFoundError(f"retrieval file not found: {path}")
    data: Any = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected {{concept: [paths]}}")
    return {str(k): [str(p) for p in v] for k, v in data.items()}


def _read_concepts(args: argparse.Namespace) -> list[str]:
    concepts = list(args.concepts or [])
    if args.concepts_file is not None:
        if not args.concepts_file.is_file():
            raise FileNotFoundError(f"concepts file not found: {args.concepts_file}")
        concepts += [line for line in args.concepts_file.read_text().splitlines() if line.strip()]
    if not concepts:
        raise ValueError("give --concepts and/or --concepts-file")
    return concepts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.retrieve", description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, type=Path, help="index directory (python -m model.index)")
    parser.add_argument("--concepts", nargs="*", help="concept names")
    parser.add_argument("--concepts-file", type=Path, help="one concept per line")
    parser.add_argument("--out", required=True, type=Path, help="directory for retrieval.json")
    parser.add_argument("-n", "--n", type=int, default=500, help="images per concept")
    add_clip_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    check_clip_file(args)
    read_manifest(args.index)
    concepts = _read_concepts(args)
    clip = load_clip_from_arguments(args)
    result = retrieve(args.index, concepts, clip, n=args.n, out_dir=args.out)
    print(f"retrieved {sum(map(len, result.values()))} paths for {len(result)} concepts into {args.out / RETRIEVAL}")
    return 0


__all__ = ["RETRIEVAL", "RETRIEVAL_SCORES", "select_concepts", "encode_concepts", "top_n", "retrieve",
           "load_retrieval", "main"]
