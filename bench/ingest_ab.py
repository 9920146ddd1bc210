"""A/B of an ingestion setting read from the environment, on one photo folder.

    .venv/bin/python bench/ingest_ab.py CLIPDEX_DECODE_GATE=0,1 /tmp/clipdex-bench/1mp/n512 tiny 6
    .venv/bin/python bench/ingest_ab.py CLIPDEX_DECODE_NICE=0,10 /tmp/clipdex-bench/1mp/n128 tiny 3

(the folders are the ones bench/ingest.py generates; `--count 512` makes n512). Each round
indexes the folder into a fresh library once per value, alternating, in a fresh subprocess (the
settings are read at import), the model loaded and warmed with one batch outside the timing.
Prints, per value, the median img/s and process CPU-ms per photo, and every run's img/s.
Settings: CLIPDEX_DECODE_NICE (decode threads' priority), CLIPDEX_DECODE_GATE (decoders wait
while the model runs on a CPU).
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE_RUN = """
import json, sys, tempfile, time, torch
sys.path.insert(0, sys.argv[3])
from index import Library
folder, spec = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as home, Library.open(home) as library:
    embedder = library.embedder(spec)
    size = embedder.image_size
    embedder.encode_image_tensors(torch.zeros(64, 3, size, size))
    cpu = time.process_time()
    report = library.index([folder], model=spec)
    cpu = time.process_time() - cpu
print(json.dumps({"img_s": report.new / report.seconds, "cpu_ms": 1000 * cpu / report.new}))
"""


def main() -> None:
    if len(sys.argv) < 4 or "=" not in sys.argv[1]:
        sys.exit(__doc__)
    name, _, values = sys.argv[1].partition("=")
    folder, spec = sys.argv[2], sys.argv[3]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    runs: dict[str, list[dict]] = {v: [] for v in values.split(",")}
    for _ in range(rounds):
        for value in runs:
            env = {**os.environ, name: value, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run([sys.executable, "-c", ONE_RUN, folder, spec, str(ROOT)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            runs[value].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{spec} {folder}, {rounds} alternating rounds, by {name}:")
    for value, got in runs.items():
        img_s = [r["img_s"] for r in got]
        print(f"  {name}={value}: median {statistics.median(img_s):.1f} img/s, "
              f"{statistics.median(r['cpu_ms'] for r in got):.2f} CPU-ms/photo; "
              f"runs {[round(x, 1) for x in img_s]}")


if __name__ == "__main__":
    main()
