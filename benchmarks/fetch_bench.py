"""First-start cost of a zoo model, without the internet: random files of the real architecture (ViT-B/16 ZUTIS
release, fp32; OpenAI-layout CLIP ViT-B/16, fp16) served by the tests' loopback mirror, fetched with
``model.fetch`` into an empty cache. Reports the file sizes, the download (loopback, so: hashing and writing, not
the network), the conversion, the cache hit, and loading the checkpoint. A script, not a test.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fetch_bench.py --out runs/fetch-bench/report.json

The real download adds (file sizes) / (bandwidth): about 85 s at 10 MB/s. The CLIP stand-in is a state dict, the
real file a TorchScript archive of the same tensors (a little larger: it also holds the model's code).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.reports import write_json_report  # noqa: E402
from model.download import DownloadPolicy, download  # noqa: E402
from model.fetch import download_path, fetch_model  # noqa: E402
from model.predictor import Predictor  # noqa: E402
from model.zoo import find_model  # noqa: E402
from tests.model.mirror import MirrorServer, write_manifest  # noqa: E402
from tests.model.official_reference import random_official_state_dict, random_openai_clip_state_dict  # noqa: E402

MB = 1e6


def make_files(folder: Path) -> tuple[Path, Path]:
    """A ViT-B/16 official-layout state dict (fp32) and a CLIP ViT-B/16 in OpenAI's layout (fp16)."""
    zutis, clip = folder / "coco_vit_b_16.pt", folder / "ViT-B-16.pt"
    if not zutis.exists():
        torch.save(random_official_state_dict(768, 12, 12, 16, 14, 512, 100, 6, 8, 2048, 256, seed=0), zutis)
    if not clip.exists():
        torch.save(random_openai_clip_state_dict(512, 768, 12, 16, 14, 512, 12, 77, seed=1), clip)
    return zutis, clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=Path, default=REPO_ROOT / "runs" / "fetch-bench",
                        help="where the random release files are made (kept for the next run)")
    parser.add_argument("--out", type=Path, help="JSON report")
    args = parser.parse_args()
    args.files.mkdir(parents=True, exist_ok=True)
    zutis, clip = make_files(args.files)
    policy = DownloadPolicy(progress="none")
    with MirrorServer() as mirror, tempfile.TemporaryDirectory() as tmp:
        mirror.files["z/coco_vit_b_16.pt"], mirror.files["c/ViT-B-16.pt"] = zutis.read_bytes(), clip.read_bytes()
        entry = {"zutis": {"url": mirror.url("z/coco_vit_b_16.pt"), "sha256": None},
                 "clip": {"url": mirror.url("c/ViT-B-16.pt"),
                          "sha256": hashlib.sha256(mirror.files["c/ViT-B-16.pt"]).hexdigest()},
                 "vocabulary": "coco", "architecture": "ViT-B-16"}
        model = find_model("bench", write_manifest(Path(tmp) / "zoo.json", {"bench": entry}))
        cache = Path(tmp) / "cache"
        begin = time.perf_counter()
        for remote in (model.zutis, model.clip):
            download(remote, download_path(remote.url, cache), policy)
        downloaded = time.perf_counter()
        result = fetch_model(model, cache, policy=policy)  # the files are cached now: check and convert only
        converted = time.perf_counter()
        hit = fetch_model(model, cache, policy=policy)
        hit_s = time.perf_counter() - converted
        begin_load = time.perf_counter()
        Predictor.from_checkpoint(result.checkpoint, "cpu", "float32")
        load_s = time.perf_counter() - begin_load
        report = {
            "zutis_file_mb": round(zutis.stat().st_size / MB, 1),
            "clip_file_mb": round(clip.stat().st_size / MB, 1),
            "checkpoint_mb": round(result.checkpoint.stat().st_size / MB, 1),
            "cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / MB, 1),
            "download_loopback_s": round(downloaded - begin, 2),
            "check_and_convert_s": round(converted - downloaded, 2),
            "cache_hit_s": round(hit_s, 3),
            "cache_hit": hit.cached,
            "load_checkpoint_s": round(load_s, 2),
            "torch_threads": torch.get_num_threads(),
        }
    print(report)
    write_json_report(args.out, report)


if __name__ == "__main__":
    main()
