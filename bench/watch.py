"""Watch mode latency: from a photo's file closing to a query against `serve --watch`
returning it.

A real `clipdex serve --watch PHOTOS --model tiny` runs in its own process. Single photos:
--singles times, one generated scene is copied in (the clock starts when the copy's file is
closed) and the API is asked every 20 ms, by a query listing the library newest first
(`GET /api/search?sort=-date&top=1000&under=PHOTOS`), until the photo is among the hits. A burst:
--burst photos are copied in as fast as the disk takes them, and each one's latency is from
its own close to the first answer that holds it. Prints p50/p95/max and the target (single
photos: p95 ≤ 2 s on 2 cores with tiny).

--library N starts from a library that already holds N synthetic vectors (bench/query.py's
clustered mixture, written straight into the store, elsewhere than the watched folder), so
what each batch costs at that size shows: catching the vector index up and, before the watch
held it in memory, re-reading and re-writing its file. The query is then limited to the
watched folder (`under=`).

    .venv/bin/python bench/watch.py --json-out bench/results/watch.json
    .venv/bin/python bench/watch.py --library 1000000 --singles 20 --burst 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listed(base: str, under: str) -> set[str]:
    query = urllib.parse.urlencode({"sort": "-date", "top": 1000, "under": under})
    with urllib.request.urlopen(f"{base}/api/search?{query}", timeout=30) as r:
        return {h["path"] for h in json.loads(r.read())["hits"]}


def _prefill(home: Path, n: int) -> dict:
    """N synthetic vectors in the library before the watch starts (bench/query.py's)."""
    sys.path.insert(0, str(REPO / "bench"))
    import query as query_bench

    vectors, labels = query_bench.library_vectors(n, seed=0)
    started = time.perf_counter()
    info = query_bench.build_library(home, vectors, labels)
    return {"vectors": n, "build_s": round(time.perf_counter() - started, 1),
            "index": info["index"]}


def _pct(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    a = np.asarray(values)
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3), "max": round(float(a.max()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=50)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--library", type=int, default=0,
                        help="synthetic vectors already in the library (default none)")
    parser.add_argument("--code", type=Path,
                        help="run the server from this checkout (PYTHONPATH), e.g. a git "
                             "worktree of an older commit, for a side-by-side comparison")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from index.synthetic.scenes import write_scenes

    work = Path(tempfile.mkdtemp(prefix="clipdex-watch-"))
    source, photos = work / "source", work / "photos"
    write_scenes(source, args.singles + args.burst + 2, seed=3)
    photos.mkdir()
    for name in ("scene_00000.jpg", "scene_00001.jpg"):  # a library to start from
        shutil.copy(source / name, photos)
    prefill = _prefill(work / "home", args.library) if args.library else None
    if prefill:
        print(f"library: {prefill}", file=sys.stderr)
    port = _free_port()
    log = open(work / "serve.log", "w")  # a file: a pipe left unread could stall the server
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.code:
        env["PYTHONPATH"] = str(args.code.resolve())
    server = subprocess.Popen(
        [str(REPO / ".venv/bin/clipdex"), "--quiet", "--home", str(work / "home"), "serve",
         "--port", str(port), "--watch", str(photos), "--model", "tiny"],
        env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                _listed(base, str(photos))
                break
            except OSError:
                time.sleep(0.2)
        files = sorted(p for p in source.glob("scene_*") if not (photos / p.name).exists())
        singles: list[float] = []
        for path in files[:args.singles]:
            shutil.copy(path, photos)
            closed = time.perf_counter()
            target = str(photos / path.name)
            while target not in _listed(base, str(photos)):
                time.sleep(0.02)
            singles.append(time.perf_counter() - closed)
        closes: dict[str, float] = {}
        for path in files[args.singles:args.singles + args.burst]:
            shutil.copy(path, photos)
            closes[str(photos / path.name)] = time.perf_counter()
        burst: dict[str, float] = {}
        while len(burst) < len(closes):
            seen = _listed(base, str(photos))
            now = time.perf_counter()
            for target in closes.keys() - burst.keys():
                if target in seen:
                    burst[target] = now - closes[target]
            time.sleep(0.05)
        # from the burst's first close to its last photo being searchable
        all_in = (max(closes[t] + lat for t, lat in burst.items()) - min(closes.values())
                  if burst else 0.0)
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    err = (work / "serve.log").read_text()
    shutil.rmtree(work, ignore_errors=True)
    # each batch's own time, as the server logs it ("watch: indexed: 3 new in 0.4s")
    batch_s = [float(m) for m in re.findall(r"^watch: indexed: .* in ([\d.]+)s", err, re.M)]
    result = {"command": " ".join(sys.argv), "cores": os.cpu_count(), "model": "tiny",
              "code": str(args.code) if args.code else "this checkout",
              "singles_s": _pct(singles), "burst_s": _pct(list(burst.values())),
              "burst_all_indexed_s": round(all_in, 2) if closes else None,
              "burst_photos": len(closes), "library": prefill,
              "batches": len(batch_s), "batch_s": _pct(batch_s)}
    s, b = result["singles_s"], result["burst_s"]
    print("| photos | p50 s | p95 s | max s |\n|---|---|---|---|")
    print(f"| {s['n']} single photos | {s['p50']} | {s['p95']} | {s['max']} |")
    print(f"| burst of {b['n']} | {b['p50']} | {b['p95']} | {b['max']} |")
    t = result["batch_s"]
    print(f"| {t['n']} batches (indexing time each) | {t['p50']} | {t['p95']} | {t['max']} |")
    print(f"single photos p95 {s['p95']} s: target ≤ 2 s "
          f"{'met' if s['p95'] <= 2 else 'MISSED'}; the whole burst was searchable "
          f"{all_in:.1f} s after its first file closed")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
