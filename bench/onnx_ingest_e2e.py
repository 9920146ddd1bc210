"""End to end: `Library.index` with the image tower on ONNX Runtime against torch (issue 14).

    .venv/bin/python bench/onnx_ingest_e2e.py /tmp/clipdex-bench/1mp/n300 ViT-B-32-256:random 3

(folders from bench/ingest.py's generator). Each round indexes the folder into a fresh library
once per runtime, alternating, each in a fresh process: `torch` is today's ingestion embedder
(`auto`), `onnx` the library's ONNX export (`auto`: int8 where it passed the probe and ran
faster), put in the Library's embedder cache so `Library.index` uses it. The model is loaded
and warmed with one batch outside the timing; img/s from the report (model load excluded).
The issue's rule: switch ingestion at >= 1.2x.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE_RUN = r"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import numpy as np
from index import Library
folder, spec, mode = sys.argv[1], sys.argv[2], sys.argv[3]
with tempfile.TemporaryDirectory() as home, Library.open(home) as library:
    torch_embedder = library.embedder(spec)
    embedder = torch_embedder
    if mode == "onnx":
        from index.onnx_export import export_model
        from index.onnx_runtime import (OnnxEmbedder, export_folder, read_manifest,
                                        share_export, shared_folder)
        folder_ = export_folder(Path(home), spec, torch_embedder.dim)
        manifest = share_export(shared_folder(folder_), folder_, spec, torch_embedder.dim)
        if manifest is None:
            folder_, manifest = export_model(Path(home), spec)
            share_export(folder_, shared_folder(folder_), spec, torch_embedder.dim)
        embedder = OnnxEmbedder(folder_, manifest, precision="auto")
        library._embedders[(spec, "auto")] = embedder
        warm = np.zeros((64, 3, embedder.image_size, embedder.image_size), np.float32)
    else:
        import torch
        warm = torch.zeros(64, 3, embedder.image_size, embedder.image_size)
    embedder.encode_image_tensors(warm)
    cpu = time.process_time()
    report = library.index([folder], model=spec)
    cpu = time.process_time() - cpu
print(json.dumps({"img_s": report.new / report.seconds, "cpu_ms": 1000 * cpu / report.new,
                  "precision": embedder.precision}))
"""


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    folder, spec = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    runs: dict[str, list[dict]] = {"torch": [], "onnx": []}
    for _ in range(rounds):
        for mode in runs:
            out = subprocess.run([sys.executable, "-c", ONE_RUN, folder, spec, mode, str(ROOT)],
                                 check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    medians = {m: statistics.median(r["img_s"] for r in got) for m, got in runs.items()}
    for mode, got in runs.items():
        print(f"{mode} ({got[0]['precision']}): median {medians[mode]:.1f} img/s, "
              f"{statistics.median(r['cpu_ms'] for r in got):.1f} CPU-ms/photo; "
              f"runs {[round(r['img_s'], 1) for r in got]}")
    print(f"onnx / torch: {medians['onnx'] / medians['torch']:.2f}x (switch at >= 1.2x)")


if __name__ == "__main__":
    main()
