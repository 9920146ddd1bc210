"""Beyond one machine (issue 18), side by side in one run, fresh processes alternating:

1. the store: `clipdex index` of the same folder of 1 MP photos with `tiny` into SQLite (the
   library's own file) and into PostgreSQL (a local server from Debian's postgresql package on
   a Unix socket, fsync on, as in production); median img/s of each and their ratio;
2. Ray: the same `clipdex index` single-process, with `--ray` (a local Ray instance, one
   model worker per core: 2 here) and with `--ray --ray-workers 1`, on a folder large enough
   for the fixed start-up to count as it would on a real library (--ray-photos).

    .venv/bin/python bench/distributed.py --photos 2000 --ray-photos 8000 --rounds 3 \
        --json-out bench/results/distributed.json

img/s is the indexing report's own (`seconds`: scanning, decoding, embedding and committing).
Both paths report the model load apart: the single process's own, and on Ray the slowest
worker's (the workers load it at once, in parallel, and nothing is embedded meanwhile), and
the Ray instance's start. What stays in `seconds` on Ray is its real overhead: worker
processes starting, Ray Data importing in them, moving results to the driver. The wall time
of each whole command (everything, imports included) is printed too. `--only store|ray`
runs one part. The merged-shards recall is bench/scale.py's (4 shards and 1 give
byte-identical list files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout
sys.path.insert(0, str(REPO / "tests"))

from bench.ingest import photo_folder  # noqa: E402


def index_once(folder: Path, db: str | None, count: int, extra: tuple[str, ...] = ()) -> dict:
    """One `clipdex index` in a fresh process and a fresh library; its JSON report."""
    home = Path(tempfile.mkdtemp(prefix="clipdex-bench-dist-"))
    try:
        command = [sys.executable, str(REPO / "cli.py"), "--home", str(home)]
        command += ["--db", db] if db else []
        command += ["index", str(folder), "--model", "tiny", "--json", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout)
        if report["new"] != count or report["failed"]:
            raise SystemExit(f"indexed {report['new']} of {count}, {report['failed']} failed")
        ray = report.get("ray", {})
        return {"img_s": count / report["seconds"], "seconds": report["seconds"],
                "model_load_s": report["model_load_seconds"],
                "ray_start_s": ray.get("start_seconds"), "workers": ray.get("workers"),
                "wall_s": wall}
    finally:
        shutil.rmtree(home, ignore_errors=True)


RAY_MODES = {"single": (), "ray-2": ("--ray",), "ray-1": ("--ray", "--ray-workers", "1")}


def bench_ray(folder: Path, count: int, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {mode: [] for mode in RAY_MODES}
    modes = list(RAY_MODES)
    for round_no in range(rounds):
        order = modes if round_no % 2 == 0 else modes[::-1]
        for mode in order:
            runs[mode].append(index_once(folder, None, count, RAY_MODES[mode]))
            r = runs[mode][-1]
            print(f"  round {round_no + 1} {mode}: {r['img_s']:.1f} img/s, wall "
                  f"{r['wall_s']:.1f} s", flush=True)
    med = {m: statistics.median(r["img_s"] for r in rows) for m, rows in runs.items()}
    wall = {m: statistics.median(r["wall_s"] for r in rows) for m, rows in runs.items()}
    result = {"photos": count, "runs": runs,
              "median_img_s": {k: round(v, 1) for k, v in med.items()},
              "median_wall_s": {k: round(v, 1) for k, v in wall.items()},
              "ray_2_vs_single": round(med["ray-2"] / med["single"], 3),
              "ray_2_vs_ray_1": round(med["ray-2"] / med["ray-1"], 3),
              "targets": {"ray_2_vs_single": ">= 0.8", "ray_2_vs_ray_1": ">= 1.6"}}
    print(f"\n{count} photos | median img/s | median wall s\n|---|---|---|")
    for mode in RAY_MODES:
        print(f"| {mode} | {med[mode]:.1f} | {wall[mode]:.1f} |")
    print(f"\nRay (2 workers) / single process: {result['ray_2_vs_single']:.2f}× (target ≥ "
          f"0.8×); 2 workers / 1: {result['ray_2_vs_ray_1']:.2f}× (target ≥ 1.6×)")
    return result


def bench_store(folder: Path, count: int, rounds: int) -> dict:
    from conftest import PostgresServer  # the test suite's throwaway server

    server = PostgresServer(settings="")  # fsync on
    runs: dict[str, list[dict]] = {"sqlite": [], "postgresql": []}
    try:
        for round_no in range(rounds):
            order = ("sqlite", "postgresql") if round_no % 2 == 0 else ("postgresql", "sqlite")
            for store in order:
                db = server.create_database(f"bench_{round_no}") if store == "postgresql" \
                    else None
                runs[store].append(index_once(folder, db, count))
                print(f"  round {round_no + 1} {store}: {runs[store][-1]['img_s']:.1f} img/s",
                      flush=True)
    finally:
        server.stop()
    medians = {store: statistics.median(r["img_s"] for r in rows)
               for store, rows in runs.items()}
    ratio = medians["postgresql"] / medians["sqlite"]
    print(f"\n| store | median img/s |\n|---|---|\n| SQLite | {medians['sqlite']:.1f} |\n"
          f"| PostgreSQL | {medians['postgresql']:.1f} |\n\nPostgreSQL / SQLite: {ratio:.2f}× "
          f"(target ≥ 0.8×)")
    return {"photos": count, "runs": runs,
            "median_img_s": {k: round(v, 1) for k, v in medians.items()},
            "postgresql_vs_sqlite": round(ratio, 3), "target": ">= 0.8"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000, help="photos of the store rows")
    parser.add_argument("--ray-photos", type=int, default=8000, help="photos of the Ray rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["store", "ray"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-bench-ingest"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    result: dict = {"size": "1mp", "model": "tiny", "rounds": args.rounds,
                    "cpus": os.cpu_count()}
    if args.only != "ray":
        folder = photo_folder(args.workdir, "1mp", args.photos)
        result["store"] = bench_store(folder, args.photos, args.rounds)
    if args.only != "store":
        folder = photo_folder(args.workdir, "1mp", args.ray_photos)
        result["ray"] = bench_ray(folder, args.ray_photos, args.rounds)
    if args.json_out:
        previous = json.loads(args.json_out.read_text()) if args.json_out.exists() else {}
        if args.only and "photos" in previous:  # the file of the store-only version
            previous = {"store": {k: v for k, v in previous.items()
                                  if k not in ("size", "model", "cpus")}}
        args.json_out.write_text(json.dumps({**previous, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
