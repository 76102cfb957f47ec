"""``python -m model.export``: the image network of a checkpoint as an ONNX or OpenVINO file, for other servers.

    python -m model.export --format onnx weights/zutis-shapes.safetensors --out exported/
    python -m model.export --format openvino weights/zutis-shapes.safetensors --out exported/

Only the image network (encoder + mask decoder + text-space projection, ``model.image_network``) is exported:
ZUTIS applies the text embeddings after it, so one file serves every vocabulary. The file takes one image of any
size (dynamic height and width) plus its two size-only inputs and returns the mask probabilities and the
unnormalised text-space projection; ``model.image_network.network_inputs`` makes the inputs and
``model.image_network.finish_outputs`` + ``model.postprocess`` turn the outputs into an answer (README,
"The exported network"). Weights are stored in float32; the runtime picks the precision it computes in.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.network import ZUTIS

FORMATS = ("onnx", "openvino")
ONNX_NAME, OPENVINO_NAME = "image_network.onnx", "image_network.xml"


def _traced_network(model: "ZUTIS"):
    """The ``ImageNetwork`` of ``model`` in float32 (a float32 copy of a reduced-precision model) and its example
    inputs (a 4 x 6 patch image: height and width differ, so that no size is mistaken for the other in tracing)."""
    import copy

    import torch

    from model.image_network import ImageNetwork, example_inputs

    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    model = model.eval()
    p = model.config.patch_size
    return ImageNetwork(model), example_inputs(model, 4 * p, 6 * p), torch


def export_openvino(model: "ZUTIS", out_dir: Path) -> Path:
    """Write the image network as OpenVINO IR (``image_network.xml`` + ``.bin``, float32 weights) into ``out_dir``;
    returns the ``.xml`` path. Height and width are dynamic (a runtime may reshape to static sizes)."""
    import openvino as ov

    network, example, torch = _traced_network(model)
    d = example[1].shape[1]
    shapes = [ov.PartialShape([1, 3, -1, -1]), ov.PartialShape([-1, d]), ov.PartialShape([-1, 1, d])]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python: sizes are inputs here
        converted = ov.convert_model(network, example_input=example, input=shapes)
    from model.image_network import INPUT_NAMES, OUTPUT_NAMES

    for port, name in zip(converted.inputs, INPUT_NAMES):
        port.get_tensor().set_names({name})
    for port, name in zip(converted.outputs, OUTPUT_NAMES):
        port.get_tensor().set_names({name})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OPENVINO_NAME
    ov.save_model(converted, path, compress_to_fp16=False)
    return path


def export_onnx(model: "ZUTIS", out_dir: Path) -> Path:
    """Write the image network as ONNX (``image_network.onnx``, opset 18, float32) into ``out_dir``; returns its
    path. Height, width and the token counts are dynamic axes."""
    from model.image_network import INPUT_NAMES, OUTPUT_NAMES

    network, example, torch = _traced_network(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_NAME
    # torch.export's exporter: the TorchScript one bakes the sequence length into attention's reshapes.
    dim = torch.export.Dim
    height, width, tokens, pixels = dim("height"), dim("width"), dim("tokens"), dim("pixels")
    dynamic = {"image": {2: height, 3: width}, "pos_embed": {0: tokens}, "mask_pos": {0: pixels}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(network, example, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=dynamic, opset_version=18, dynamo=True, verbose=False)
    program.save(str(path))
    return path


def export_network(checkpoint: Path, fmt: str, out_dir: Path) -> Path:
    """Export ``checkpoint``'s image network in ``fmt`` (``onnx`` or ``openvino``) into ``out_dir``, with a
    ``network.json`` beside it (checkpoint id and hash, inputs, outputs, normalisation); returns the file."""
    from model.checkpoint import load_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use onnx or openvino")
    loaded = load_checkpoint(checkpoint, "cpu")
    path = (export_onnx if fmt == "onnx" else export_openvino)(loaded.model, out_dir)
    cfg = loaded.metadata.model_config
    (out_dir / "network.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "checkpoint_id": loaded.checkpoint_id, "sha256": loaded.sha256,
        "format": fmt, "file": path.name, "patch_size": cfg.patch_size,
        "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
        "inputs": {"image": "(1, 3, H, W) float32, normalised", "pos_embed": "(1 + h*w, D) float32",
                   "mask_pos": "(4*h*w, 1, D) float32"},
        "outputs": {"mask_probs": "(1, Q, 4*h*w)", "text_proj": "(1, 4*h*w, E), not normalised"},
    }, indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint file (.safetensors, our format)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="onnx or openvino (IR .xml + .bin)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")
    try:
        path = export_network(Path(args.checkpoint), args.format, Path(args.out))
    except (ValueError, ImportError) as exc:
        parser.error(str(exc))
    sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
