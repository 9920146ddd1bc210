"""Should ingestion run the image tower on ONNX Runtime? (issue 14, item 5) Model-only figures.

    .venv/bin/python bench/onnx_ingest.py --json-out bench/results/onnx_ingest.json

For each model (tiny, ViT-B-32:random), side by side in one process, batch 64 of real 1 MP
photos from bench/ingest.py's generator, preprocessed once: img/s of today's ingestion
embedder (torch, `auto`: int8 towers where they pass the probe) against ONNX Runtime fp32 and
int8 (onnxruntime's dynamic quantisation of the exported fp32 tower), rounds alternated, median;
cosine of each to fp32 torch. The rule: switch ingestion only at >= 1.2x the torch path's img/s
with cosine >= 0.999. End to end adds the same decode work to every variant on the same 2 cores,
so a variant that is not 1.2x faster model-only cannot be 1.2x faster end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BATCH = 64
SWITCH_RATIO = 1.2
MIN_COSINE = 0.999


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_image_tower(spec: str, workdir: Path) -> tuple[Path, Path]:
    """fp32 and int8 image towers of `spec` (the export's own code, both files kept)."""
    import torch

    from index.clip import _create, resolve_spec
    from index.onnx_export import OPSET, _ImageTower
    from index.precision import split_attention

    fp32, int8 = workdir / "image.onnx", workdir / "image.int8.onnx"
    model, _, _ = _create(resolve_spec(spec), spec)
    model = model.float().eval()
    split_attention(model)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    with torch.no_grad():
        torch.onnx.export(_ImageTower(model), (torch.zeros(2, 3, size, size),), str(fp32),
                          input_names=["pixels"], output_names=["vector"],
                          dynamic_axes={"pixels": {0: "batch"}, "vector": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8


def bench_model(spec: str, photos: list[str], rounds: int) -> dict:

    from index.clip import ClipEmbedder
    from index.scan import decode_file

    torch_auto = ClipEmbedder.load(spec, device="cpu", precision="auto")
    torch_fp32 = ClipEmbedder.load(spec, device="cpu", precision="fp32")
    images = [decode_file(p, min_side=2 * torch_auto.image_size).image for p in photos]
    batch = torch_auto.collate([torch_auto.prepare(im) for im in images])[:BATCH]
    reference = torch_fp32.encode_image_tensors(batch)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = export_image_tower(spec, Path(tmp))
        pixels = batch.numpy()
        runners = {
            f"torch {torch_auto.precision}": lambda: torch_auto.encode_image_tensors(batch),
            "onnx fp32": (lambda s: lambda: s.run(None, {"pixels": pixels})[0])(
                ort_session(fp32_path)),
            "onnx int8": (lambda s: lambda: s.run(None, {"pixels": pixels})[0])(
                ort_session(int8_path)),
        }
        speeds: dict[str, list[float]] = {name: [] for name in runners}
        cosines = {}
        for name, run in runners.items():
            out = np.asarray(run(), np.float64)  # warm-up, and the vectors
            out /= np.linalg.norm(out, axis=1, keepdims=True)
            cosines[name] = float((out * reference).sum(1).min())
        for _ in range(rounds):
            for name, run in runners.items():
                started = time.perf_counter()
                run()
                speeds[name].append(len(pixels) / (time.perf_counter() - started))
    base = f"torch {torch_auto.precision}"
    rows = {name: {"img_s": statistics.median(v), "min_cosine_to_fp32": cosines[name]}
            for name, v in speeds.items()}
    for name, row in rows.items():
        row["over_torch"] = row["img_s"] / rows[base]["img_s"]
        row["switch"] = (name != base and row["over_torch"] >= SWITCH_RATIO
                         and row["min_cosine_to_fp32"] >= MIN_COSINE)
    return {"model": spec, "batch": len(pixels), "rounds": rounds, "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="tiny,ViT-B-32:random")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-bench"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    from ingest import photo_folder, photo_paths  # bench/ingest.py

    photos = photo_paths(photo_folder(args.workdir, "1mp", BATCH))
    results = [bench_model(spec, photos, args.rounds) for spec in args.models.split(",")]
    print("| model | variant | img/s (batch 64) | × torch path | min cosine to fp32 | switch? |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for name, row in result["variants"].items():
            print(f"| {result['model']} | {name} | {row['img_s']:.1f} | {row['over_torch']:.2f}× "
                  f"| {row['min_cosine_to_fp32']:.5f} | {'yes' if row['switch'] else 'no'} |")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
