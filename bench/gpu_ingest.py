"""One-off GPU check of ingestion (run on a machine with CUDA): model-only speed and
end-to-end `Library.index` with 4 decode workers (the old cap) and the default (one per core).

    python bench/gpu_ingest.py --json-out gpu_ingest.json

Generates 1 MP and 12 MP photos like bench/ingest.py (cached under --workdir). On a GPU the
model is far faster than decoding, so end-to-end speed follows the decode threads.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ingest import photo_folder  # noqa: E402  (bench/ingest.py)

from index import Library  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-bench")
    parser.add_argument("--model", default="ViT-B-32:random")
    parser.add_argument("--counts", default="1mp:1024,12mp:256")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__, "runs": []}
    folders = {}
    for part in args.counts.split(","):
        size, _, count = part.partition(":")
        folders[size] = photo_folder(args.workdir, size, int(count))
    with tempfile.TemporaryDirectory() as warm, Library.open(warm) as library:
        embedder = library.embedder(args.model)
        out["precision"], out["embed_device"] = embedder.precision, str(embedder.device)
        size = embedder.image_size
        for batch in (64, 256):
            x = torch.randn(batch, 3, size, size)
            embedder.encode_image_tensors(x)
            started = time.perf_counter()
            for _ in range(5):
                embedder.encode_image_tensors(x)
            out[f"model_only_img_s_b{batch}"] = 5 * batch / (time.perf_counter() - started)
    for size, folder in folders.items():
        for workers in (4, None):  # 4: the cap before 2026-11-27; None: the default
            with tempfile.TemporaryDirectory() as home, Library.open(home) as library:
                library.embedder(args.model)
                report = library.index([folder], model=args.model, workers=workers)
            run = {"size": size, "photos": report.new, "workers": workers or "default",
                   "img_s": report.new / report.seconds, "failed": report.failed}
            print(run, flush=True)
            out["runs"].append(run)
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
