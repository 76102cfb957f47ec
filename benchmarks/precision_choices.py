"""What keeping float32 costs and keeps where the bfloat16 path keeps it, measured in one run on CPU.

1. Layer norms: the torch bfloat16 network with float32 layer-norm weights (what ``Predictor`` does) against
   one with bfloat16 layer-norm weights: forward seconds (interleaved rounds) and the largest differences of the
   outputs from the float32 network's.
2. The text-space normalisation (layer norm over (h', w', E), then unit norm per pixel): float32
   (``model.network.normalise_text_space``) against the same arithmetic in bfloat16, on a 60 x 80 x 512 grid
   (ViT-B/16 at 480 x 640): milliseconds and the largest difference of the features.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/precision_choices.py \\
        --checkpoint runs/bench/cpu/zutis-random-vit-b-32.safetensors     # made by benchmarks/cpu_bench.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.cpu_bench import synthetic_image  # noqa: E402


def bf16_text_space(proj):
    """``normalise_text_space`` for one whole-grid image, computed in bfloat16 (the alternative not taken)."""
    import torch

    x = proj.to(torch.bfloat16)
    var, mean = torch.var_mean(x[0], unbiased=False)
    normed = (x - mean) / torch.sqrt(var + 1e-5)
    return (normed / (normed.norm(dim=-1, keepdim=True) + 1e-7)).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    from model.network import normalise_text_space
    from model.predictor import Predictor

    image = synthetic_image()
    reference = Predictor.from_checkpoint(args.checkpoint, "cpu", "float32", runtime="torch")
    variants = {"layer norms float32": Predictor.from_checkpoint(args.checkpoint, "cpu", "bfloat16", runtime="torch"),
                "layer norms bfloat16": Predictor.from_checkpoint(args.checkpoint, "cpu", "bfloat16", runtime="torch")}
    for module in variants["layer norms bfloat16"].model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.to(torch.bfloat16)
    prepared = reference.prepare(image)
    expected = reference.forward([prepared])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.rounds):
        for name, predictor in variants.items():
            start = time.perf_counter()
            outputs[name] = predictor.forward([prepared])
            seconds[name].append(time.perf_counter() - start)
    for name, out in outputs.items():
        print(f"{name}: forward median {statistics.median(seconds[name]):.3f} s (best {min(seconds[name]):.3f}); "
              f"largest difference from float32: mask probabilities "
              f"{(out.mask_probs - expected.mask_probs).abs().max():.4f}, semantic features "
              f"{(out.semantic_features - expected.semantic_features).abs().max():.4f}")

    proj = torch.randn(1, 60, 80, 512, generator=torch.Generator().manual_seed(0)) * 3 + 1
    exact = normalise_text_space(proj, [60], [80])
    timings = {}
    for name, fn in (("float32", lambda: normalise_text_space(proj, [60], [80])),
                     ("bfloat16", lambda: bf16_text_space(proj))):
        fn()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        timings[name] = (time.perf_counter() - start) / 20 * 1e3
    print(f"text-space normalisation: float32 {timings['float32']:.1f} ms, bfloat16 {timings['bfloat16']:.1f} ms "
          f"(moves features by up to {(bf16_text_space(proj) - exact).abs().max():.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
