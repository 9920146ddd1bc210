"""How far compressed codes' scores stray from the exact ones (issue 17; duplicates.CODE_SLACK).

    .venv/bin/python bench/code_error.py --workdir /tmp/scale-bench --n 10000000 --dim 512 \
        --index "IVF4096,PQ64x8"

Reads an index that bench/scale.py built and cached under --workdir (read as the library reads
it, lists memory-mapped beside their header), searches bench/scale.py's 200 held-out queries
for their --depth best candidates at the library's nprobe, and compares FAISS's scores with the
exact ones over the float16 vectors: |error| median, p99 and max, over all candidates and over
pairs whose exact cosine is above 0.9 (those `clipdex duplicates` cares about).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from bench import scale  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-bench-scale"))
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--index", required=True, help="the factory string bench/scale.py used")
    parser.add_argument("--depth", type=int, default=200)
    args = parser.parse_args()

    from index import vectors as iv

    path = scale.index_path(args.workdir, args.n, args.dim, args.index)
    if not path.exists():
        raise SystemExit(f"{path} is not there: run bench/scale.py with --configs first")
    index = iv.read_index_file(path, 0, args.dim)
    iv._set_search_knobs(index)
    data = scale.load_vectors(args.workdir, args.n, args.dim)
    q = scale.queries(args.dim)
    errors, near = [], []
    for row in q:
        scores, ids = index.search(np.ascontiguousarray(row[None, :], np.float32), args.depth)
        keep = ids[0] >= 0
        vectors = np.asarray(data[ids[0][keep] - 1], np.float32)  # store ids are row + 1
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        exact = vectors @ row
        error = np.abs(scores[0][keep] - exact)
        errors.append(error)
        near.append(error[exact > 0.9])
    for name, values in (("all candidates", np.concatenate(errors)),
                         ("exact cosine > 0.9", np.concatenate(near))):
        if len(values):
            print(f"{args.index} {name} ({len(values):,}): |error| median "
                  f"{np.median(values):.4f}, p99 {np.percentile(values, 99):.4f}, "
                  f"max {values.max():.4f}")
        else:
            print(f"{args.index} {name}: none")


if __name__ == "__main__":
    main()
