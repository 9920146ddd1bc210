"""A/B of the decode threads' lower priority (index/ingest.py DECODE_NICE) on one photo folder.

    .venv/bin/python bench/decode_priority.py /tmp/clipdex-bench/1mp/n128 tiny 3
    .venv/bin/python bench/decode_priority.py /tmp/clipdex-bench/1mp/n128 ViT-B-32:random 2

(the folders are the ones bench/ingest.py generates). Each round indexes the folder into a fresh
library with CLIPDEX_DECODE_NICE=0 and then =10, alternating, the model loaded outside the timing;
prints img/s per run for each setting.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from index import Library  # noqa: E402


def main() -> None:
    folder, spec, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2
    results: dict[str, list[float]] = {"0": [], "10": []}
    for _ in range(rounds):
        for nice in results:
            os.environ["CLIPDEX_DECODE_NICE"] = nice
            home = tempfile.mkdtemp()
            library = Library.open(home)
            try:
                library.embedder(spec)  # load outside the timing
                started = time.perf_counter()
                report = library.index([folder], model=spec)
                results[nice].append(round(report.new / (time.perf_counter() - started), 1))
            finally:
                library.close()
                shutil.rmtree(home)
    print(spec, folder, "img/s by CLIPDEX_DECODE_NICE:", json.dumps(results))


if __name__ == "__main__":
    main()
