"""``zutis-client``: segment many images with a running zutis-service, concurrently.

    zutis-client [--url URL] [--api-key KEY] segment IMAGES_OR_FOLDERS... --concepts C [C ...]
                 [--out results.json] [--coco-results [--coco-gt instances.json]] [--overlay-dir DIR]
                 [--concurrency 8]

The URL defaults to ``$ZUTIS_URL`` or http://127.0.0.1:8000, the key to ``$ZUTIS_API_KEY``. Writes every answer
as JSON (``{"results": [{"image", "answer"} | {"image", "error"}]}``) or, with ``--coco-results``, one COCO results
list that ``pycocotools`` scores. One record per image, whatever happened to it: a failure (the request, the file,
the overlay) is recorded with its own type and message and never stops the others; ``--out`` is written atomically,
also when some images failed or the run was interrupted (Ctrl-C: unfinished images are recorded as
``interrupted``). Exit status: 0 when every image was answered, 1 when some failed (the others are still written),
2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from tqdm import tqdm

from zutis_client.client import DEFAULT_URL, AsyncClient, MaskFormat, Vocabulary
from zutis_client.errors import ZutisError
from zutis_client.result import SegmentResult
from zutis_client.retry import RetryPolicy
from zutis_client.upload import read_file

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zutis-client", description="Client of zutis-service.")
    parser.add_argument("--url", default=os.environ.get("ZUTIS_URL", DEFAULT_URL),
                        help="the service's base URL (default: $ZUTIS_URL or %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("ZUTIS_API_KEY"),
                        help="API key, sent as X-API-Key (default: $ZUTIS_API_KEY)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    parser.add_argument("--retries", type=int, default=3, help="retries of 503 answers (Retry-After honoured)")
    commands = parser.add_subparsers(dest="command", required=True)
    seg = commands.add_parser("segment", help="segment images or folders of images")
    seg.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    seg.add_argument("--concepts", nargs="+",
                     help="concept names; several arguments and/or comma-separated (or --vocabulary)")
    seg.add_argument("--vocabulary", choices=get_args(Vocabulary),
                     help="a named vocabulary of the service instead of --concepts")
    seg.add_argument("--mask-format", choices=get_args(MaskFormat), default="rle",
                     help="instance masks as COCO RLE (default) or COCO polygons")
    seg.add_argument("--polygon-tolerance", type=float, help="polygon simplification in pixels (service default 1)")
    seg.add_argument("--json", dest="send", action="store_const", const="json", default="multipart",
                     help="send JSON bodies (image in base64) instead of multipart forms")
    seg.add_argument("--out", type=Path, help="write the JSON here instead of standard output")
    seg.add_argument("--coco-results", action="store_true",
                     help="write one COCO results list (image_id, category_id, segmentation, bbox, score)")
    seg.add_argument("--coco-gt", type=Path,
                     help="a COCO instances file: image ids by file name, category ids by category name")
    seg.add_argument("--overlay-dir", type=Path, help="also write each image with its answer drawn, as PNG")
    seg.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    seg.add_argument("--score-threshold", type=float)
    seg.add_argument("--mask-threshold", type=float)
    seg.add_argument("--nms-iou", type=float)
    seg.add_argument("--max-instances", type=int)
    seg.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def normalise_concept(name: str) -> str:
    """A concept name as the service reports it: whitespace collapsed, lower case."""
    return re.sub(r"\s+", " ", name).strip().lower()


def split_concepts(values: Sequence[str]) -> list[str]:
    """Arguments (each possibly comma-separated) -> distinct normalised names, in order."""
    names: list[str] = []
    for value in values:
        for part in value.split(","):
            name = normalise_concept(part)
            if name and name != "background" and name not in names:
                names.append(name)
    return names


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders searched recursively for image suffixes (sorted); duplicates dropped.

    Raises:
        FileNotFoundError: an input does not exist.
    """
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return list(dict.fromkeys(found))


class CocoIds:
    """Image and category ids of a COCO results file: from a ground-truth file when given (image by file name,
    category by normalised name), else 1..N in input order and 1..K in concept order."""

    def __init__(self, images: Sequence[Path], concepts: Sequence[str], gt: Path | None) -> None:
        if gt is None:
            self.images = {str(path): i + 1 for i, path in enumerate(images)}
            self.categories = {name: k + 1 for k, name in enumerate(concepts)}
            return
        data = json.loads(gt.read_text(encoding="utf-8"))
        by_name = {Path(image["file_name"]).name: int(image["id"]) for image in data["images"]}
        self.images = {str(path): by_name[path.name] for path in images if path.name in by_name}
        self.categories = {normalise_concept(c["name"]): int(c["id"]) for c in data["categories"]}
        unknown = [name for name in concepts if name not in self.categories]
        if unknown:
            raise ValueError(f"concepts {unknown} are not categories of {gt}")

    def image_id(self, path: Path) -> int:
        if str(path) not in self.images:
            raise ZutisError("unknown_image", f"{path.name} is not an image of the ground-truth file")
        return self.images[str(path)]


def overlay_name(path: Path, taken: set[str]) -> str:
    """``<stem>.png``, or ``<stem>-2.png``... when another input had the same stem."""
    name, n = f"{path.stem}.png", 1
    while name in taken:
        n += 1
        name = f"{path.stem}-{n}.png"
    taken.add(name)
    return name


def error_record(exc: BaseException) -> dict[str, Any]:
    """The ``error`` of an image's record: the failure's own type and message (``ZutisError``s keep theirs; anything
    else is ``client_error`` naming the exception), and the HTTP status when there was an answer."""
    if isinstance(exc, ZutisError):
        return {"type": exc.type, "message": exc.message, "status": exc.status}
    return {"type": "client_error", "message": f"{type(exc).__name__}: {exc}", "status": None}


async def segment_all(args: argparse.Namespace, images: list[Path], concepts: list[str],
                      records: list[dict[str, Any]]) -> None:
    """Segment ``images`` with at most ``args.concurrency`` requests in flight, filling ``records`` (one per image,
    in order) as answers arrive, so that an interrupted run keeps what it has. A failure of one image (its
    request, its file, its overlay) is recorded with its own cause and never touches the others."""
    names: set[str] = set()
    overlays = [overlay_name(p, names) for p in images] if args.overlay_dir else []
    if args.overlay_dir:
        args.overlay_dir.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(max(1, args.concurrency))
    progress = tqdm(total=len(images), unit="img", disable=args.no_progress, file=sys.stderr)
    async with AsyncClient(args.url, args.api_key, timeout_s=args.timeout, retry=RetryPolicy(retries=args.retries),
                           max_connections=max(1, args.concurrency)) as client:

        async def one(index: int, path: Path) -> None:
            async with gate:
                record: dict[str, Any] = {"image": str(path)}
                try:
                    data = await asyncio.to_thread(read_file, path)
                    result = await client.segment(data, concepts or None, vocabulary=args.vocabulary,
                                                  score_threshold=args.score_threshold,
                                                  mask_threshold=args.mask_threshold, nms_iou=args.nms_iou,
                                                  max_instances=args.max_instances, mask_format=args.mask_format,
                                                  polygon_tolerance=args.polygon_tolerance, send=args.send)
                    record["answer"] = result.raw
                except Exception as exc:  # noqa: BLE001 - every failure is this image's, recorded with its cause
                    record["error"] = error_record(exc)
                if "answer" in record and args.overlay_dir:
                    try:
                        picture = await asyncio.to_thread(result.overlay, data)
                        await asyncio.to_thread(picture.save, args.overlay_dir / overlays[index])
                    except Exception as exc:  # noqa: BLE001 - the answer is kept; the overlay's own cause
                        record["error"] = error_record(exc)
                        record["error"]["message"] = f"answered, but the overlay was not written: " \
                                                     f"{record['error']['message']}"
                if "error" in record:
                    progress.write(f"{path}: {record['error']['message']} ({record['error']['type']})",
                                   file=sys.stderr)
                records[index] = record
                progress.update(1)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(images)))
    progress.close()


def coco_results(records: list[dict[str, Any]], ids: CocoIds) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The COCO results list of the answered records, and the records that could not be converted."""
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for record in records:
        if "answer" not in record:
            failed.append(record)
            continue
        try:
            image_id = ids.image_id(Path(record["image"]))
        except ZutisError as exc:
            failed.append({"image": record["image"], "error": {"type": exc.type, "message": exc.message,
                                                               "status": None}})
            continue
        results.extend(SegmentResult.from_json(record["answer"]).to_coco(image_id, ids.categories))
    return results, failed


def run_segment(args: argparse.Namespace) -> int:
    if args.coco_gt is not None and not args.coco_results:
        print("zutis-client: error: --coco-gt only makes sense with --coco-results", file=sys.stderr)
        return 2
    if (args.concepts is None) == (args.vocabulary is None):
        print("zutis-client: error: give --concepts or --vocabulary (one of them)", file=sys.stderr)
        return 2
    concepts = split_concepts(args.concepts or [])
    if args.concepts is not None and not concepts:
        print("zutis-client: error: --concepts has no concept names", file=sys.stderr)
        return 2
    if args.vocabulary is not None and args.coco_results and args.coco_gt is None:
        print("zutis-client: error: --coco-results with --vocabulary needs --coco-gt (category ids by name)",
              file=sys.stderr)
        return 2
    try:
        images = find_images(args.inputs)
        ids = CocoIds(images, concepts, args.coco_gt) if args.coco_results else None
    except (OSError, ValueError, KeyError) as exc:
        print(f"zutis-client: error: {exc}", file=sys.stderr)
        return 2
    if not images:
        print("zutis-client: error: no images found in the inputs", file=sys.stderr)
        return 2
    records: list[dict[str, Any]] = [{} for _ in images]
    interrupted = False
    try:
        asyncio.run(segment_all(args, images, concepts, records))
    except KeyboardInterrupt:
        interrupted = True
    for path, record in zip(images, records):
        if not record:  # not finished when the run was interrupted
            record.update(image=str(path), error={"type": "interrupted", "message": "the run was interrupted "
                                                  "before this image was answered", "status": None})
    failed = [r for r in records if "error" in r]
    if ids is not None:
        output: Any
        output, failed = coco_results(records, ids)
    else:
        output = {"url": args.url, "concepts": concepts, "results": records}
        if args.vocabulary is not None:
            output["vocabulary"] = args.vocabulary
    text = json.dumps(output) + "\n"
    if args.out:
        write_atomically(args.out, text)
    else:
        sys.stdout.write(text)
    print(f"zutis-client: {len(images) - len(failed)} of {len(images)} image(s) answered", file=sys.stderr)
    return 130 if interrupted else 1 if failed else 0


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: a reader (or a crash)
    sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """The ``zutis-client`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "segment":
        return run_segment(args)
    return 2  # pragma: no cover (argparse requires a command)


if __name__ == "__main__":
    sys.exit(main())
