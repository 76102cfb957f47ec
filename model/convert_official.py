"""Official ZUTIS release checkpoint + OpenAI CLIP weights -> our checkpoint format (reference §1.10, §2).

The official files (github.com/NoelShin/zutis, e.g. ``coco_vit_b_16.pt``) are raw ``state_dict``s of 275 fp32
tensors: the fine-tuned CLIP image encoder, the two FFN heads, the decoder and the queries. They contain neither
the CLIP text tower nor the category list, so both come from elsewhere: the text tower from OpenAI's CLIP file of
the same architecture (``ViT-B-16.pt`` / ``ViT-B-32.pt``), the ordered category list from ``model/data``.
Our network keeps the official parameter names, so the tensors are copied one to one under ``zutis.``.

    python -m model.convert_official --zutis coco_vit_b_16.pt --clip ViT-B-16.pt --vocabulary coco \\
        --out weights/zutis-coco-vit-b-16.safetensors
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from model.checkpoint import CheckpointMetadata, file_sha256, save_checkpoint
from model.clip_weights import load_clip
from model.config import InferenceParams, ModelConfig
from model.network import ZUTIS
from model.vocabularies import load_vocabulary

# Our open_clip architecture for each official CLIP arch (QuickGELU, as OpenAI's weights were trained with).
ARCHITECTURES = {"ViT-B-16": "ViT-B-16-quickgelu", "ViT-B-32": "ViT-B-32-quickgelu"}
_PATCH_TO_ARCH = {16: "ViT-B-16", 32: "ViT-B-32"}

# The official inference protocol (reference §3.3-3.4); 640 = the longer side of COCO images, so neither the
# native cap nor the letterbox resizes them.
OFFICIAL_INFERENCE = InferenceParams(mask_threshold=0.5, temperature=5.0, nms_iou=0.3, score_threshold=0.001,
                                     max_instances=100)
OFFICIAL_INPUT_SIZE = 640
# The official protocol runs every image at its own size (reference §3.1): native geometry, with the input size
# as the longer-side cap. ImageNet-S caps at 1024: model.fetch (model.zoo.official_input_size) passes input_size
# 1024 for it; this command stores 640 for every vocabulary, and ZUTIS_INPUT_SIZE=1024 sets it at serving time.
OFFICIAL_GEOMETRY = "native"


class InputFileError(ValueError):
    """One of the two input files is unusable; ``path`` says which (the message is the plain ``ValueError``'s)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


def official_model_config(arch: str) -> ModelConfig:
    """The ``ModelConfig`` of an official release: ImageNet mean/std, 100 queries, 6x8-head decoder, FFN 2048/256."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown official architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ModelConfig(clip_model=ARCHITECTURES[arch], num_queries=100, decoder_layers=6, decoder_heads=8,
                       decoder_ffn_dim=2048, ffn_hidden_dim=256)


def read_official_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read an official checkpoint (a raw ``state_dict``) with ``torch.load(weights_only=True)`` on the CPU.

    ``mmap``: memory-map the file, so that only the tensors used are read (checking a file before using it);
    files in the pre-1.6 (non-zip) format, which cannot be mapped, are then read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official ZUTIS checkpoint not found: {path}")
    try:
        obj = _load_weights(path, mmap)
    except Exception as exc:  # a TorchScript archive, a pickle with objects, a truncated download...
        raise ValueError(f"{path}: not a weights-only torch file ({exc})") from exc
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors (the official release format), "
                         f"got {type(obj).__name__}" + (f" with keys {list(obj)[:5]}" if isinstance(obj, dict) else ""))
    return dict(obj)


def _load_weights(path: Path, mmap: bool) -> object:
    if mmap:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - pre-1.6 (non-zip) files cannot be mapped; the plain read reports the rest
            pass
    return torch.load(str(path), map_location="cpu", weights_only=True)


def infer_architecture(state: dict[str, torch.Tensor]) -> str:
    """``"ViT-B-16"`` or ``"ViT-B-32"`` from the patch size of ``encoder.conv1.weight`` (D, 3, P, P)."""
    conv = state.get("encoder.conv1.weight")
    if conv is None or conv.ndim != 4:
        raise ValueError("not an official ZUTIS state dict: no 4-d encoder.conv1.weight")
    patch = int(conv.shape[-1])
    if patch not in _PATCH_TO_ARCH:
        raise ValueError(f"encoder.conv1.weight has patch size {patch}; official releases use 16 or 32")
    return _PATCH_TO_ARCH[patch]


def check_layout(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """``ValueError`` unless ``state`` has exactly the keys and shapes of ``expected`` (order is irrelevant)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(state)} tensors, expected {len(expected)}"]
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise ValueError(f"{source} does not match the official ZUTIS layout: " + "; ".join(parts))


def check_values(state: dict[str, torch.Tensor], source: str) -> None:
    """``ValueError`` unless every tensor is floating point and finite (a truncated or corrupted file)."""
    bad = [k for k, v in state.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source}: non-float or non-finite values in {bad[:5]}")


def convert_official(zutis_path: str | Path, clip_path: str | Path, vocabulary: str, out_path: str | Path,
                     arch: str | None = None, model_config: ModelConfig | None = None,
                     command: str | None = None, input_size: int = OFFICIAL_INPUT_SIZE,
                     geometry: str = OFFICIAL_GEOMETRY, extra_provenance: dict[str, Any] | None = None) -> Path:
    """Convert one official checkpoint; returns the written path.

    Args:
        zutis_path: the official release file (raw state dict).
        clip_path: OpenAI's CLIP weights of the same architecture (TorchScript archive, state dict or our CLIP
            safetensors); its text tower is stored in the checkpoint, its image tower only checked.
        vocabulary: ``coco``, ``coca`` or ``imagenet_s919`` (the training category list, background first).
        out_path: the ``.safetensors`` checkpoint to write.
        arch: ``ViT-B-16`` / ``ViT-B-32``; default inferred from the patch size.
        model_config: overrides the official architecture entirely (tests use tiny random models).
        command: recorded in the provenance (default: this process's command line).
        input_size, geometry: the inference defaults stored (the official protocol: 640, native; ImageNet-S 1024).
        extra_provenance: more provenance entries (``model.fetch``: URLs, the zoo name); a ``zutis_sha256`` or
            ``clip_sha256`` given here is trusted instead of hashing the file again.

    ``InputFileError`` (a ``ValueError`` with the culprit's ``path``) when a file is not what it should be.
    """
    zutis_path, clip_path, out_path = Path(zutis_path), Path(clip_path), Path(out_path)
    for what, p in (("official ZUTIS checkpoint", zutis_path), ("CLIP weights file", clip_path)):
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found: {p}")
    names = load_vocabulary(vocabulary)  # ValueError for an unknown name, before any heavy work
    try:
        model, model_config, arch = load_official_network(zutis_path, arch, model_config)
    except ValueError as exc:
        raise InputFileError(zutis_path, str(exc)) from exc
    try:
        towers = load_clip(clip_path, model_config)
    except ValueError as exc:
        wanted = model_config.clip_model or "of the configured architecture"
        raise InputFileError(clip_path, f"{clip_path} is not CLIP {wanted} weights: {exc}") from exc
    metadata = CheckpointMetadata(
        model_id=f"zutis-official-{vocabulary.replace('_', '-')}-{(arch or 'custom').lower()}",
        model_config=model_config,
        vocabulary=names,
        inference=OFFICIAL_INFERENCE,
        input_size=input_size,
        prompt_templates=None,  # the official models embed the raw category names
        geometry=geometry,
        provenance=conversion_provenance(zutis_path, clip_path, vocabulary, command, extra_provenance),
    )
    return save_checkpoint(out_path, model, towers.text, metadata)


def load_official_network(zutis_path: Path, arch: str | None,
                          model_config: ModelConfig | None) -> tuple[ZUTIS, ModelConfig, str | None]:
    """The release file as our ``ZUTIS`` (eval mode, float32), after checking its layout and values; with its
    config (the official one of ``arch``, inferred from the patch size, unless ``model_config`` is given)."""
    state = read_official_state_dict(zutis_path)
    if model_config is None:
        inferred = infer_architecture(state)
        if arch is not None and arch != inferred:
            raise ValueError(f"--arch {arch} given, but {zutis_path.name} has the patch size of {inferred}")
        arch = inferred
        model_config = official_model_config(arch)
    model = ZUTIS(model_config)
    check_layout(state, model.state_dict(), str(zutis_path))
    check_values(state, str(zutis_path))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval(), model_config, arch


def conversion_provenance(zutis_path: Path, clip_path: Path, vocabulary: str, command: str | None,
                          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a converted checkpoint came from: both input files (name and sha256), the vocabulary, the command
    (default: this process's command line), the date, and ``extra`` (whose hashes, when given, are not
    recomputed)."""
    extra = dict(extra or {})
    return {
        "source": "official ZUTIS release (github.com/NoelShin/zutis), converted by model.convert_official",
        "zutis_file": zutis_path.name,
        "zutis_sha256": extra.pop("zutis_sha256", None) or file_sha256(zutis_path),
        "clip_file": clip_path.name,
        "clip_sha256": extra.pop("clip_sha256", None) or file_sha256(clip_path),
        "vocabulary": vocabulary,
        "command": command if command is not None else shlex.join([sys.executable, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert_official", description=__doc__.split("\n\n")[0])
    parser.add_argument("--zutis", required=True, type=Path, help="official release file, e.g. coco_vit_b_16.pt")
    parser.add_argument("--clip", required=True, type=Path, help="OpenAI CLIP weights of the same arch (ViT-B-16.pt)")
    parser.add_argument("--vocabulary", required=True, choices=["coco", "coca", "imagenet_s919"],
                        help="the category list the checkpoint was trained with")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors checkpoint")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="default: inferred from the patch size")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "model.convert_official",
                          *(sys.argv[1:] if argv is None else list(argv))])
    try:
        out = convert_official(args.zutis, args.clip, args.vocabulary, args.out, arch=args.arch, command=command)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
