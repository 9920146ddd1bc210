"""Beyond one machine (issue 18): so far, the store row. `clipdex index` of the same folder of
1 MP photos with `tiny`, into SQLite (the library's own file) and into PostgreSQL (a local
server from Debian's postgresql package on a Unix socket, fsync on, as in production), in
fresh processes that alternate between the two stores; median img/s of each and their ratio.

    .venv/bin/python bench/distributed.py --photos 2000 --rounds 3 \\
        --json-out bench/results/distributed.json

img/s is the indexing report's own (`seconds`: scanning, decoding, embedding and committing;
the model load is reported apart). The Ray rows of the issue (`clipdex index --ray`, 1 vs 2
workers) and the merged-shards recall are not here: the Ray path is not built yet, and the
shards' recall is bench/scale.py's (4 shards and 1 give byte-identical list files).
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


def index_once(folder: Path, db: str | None, count: int) -> dict:
    """One `clipdex index` in a fresh process and a fresh library; its JSON report."""
    home = Path(tempfile.mkdtemp(prefix="clipdex-bench-dist-"))
    try:
        command = [sys.executable, str(REPO / "cli.py"), "--home", str(home)]
        command += ["--db", db] if db else []
        command += ["index", str(folder), "--model", "tiny", "--json"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
        report = json.loads(done.stdout)
        if report["new"] != count or report["failed"]:
            raise SystemExit(f"indexed {report['new']} of {count}, {report['failed']} failed")
        return {"img_s": count / report["seconds"], "seconds": report["seconds"],
                "wall_s": wall}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-bench-ingest"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from conftest import PostgresServer  # the test suite's throwaway server

    folder = photo_folder(args.workdir, "1mp", args.photos)
    server = PostgresServer(settings="")  # fsync on
    runs: dict[str, list[dict]] = {"sqlite": [], "postgresql": []}
    try:
        for round_no in range(args.rounds):
            order = ("sqlite", "postgresql") if round_no % 2 == 0 else ("postgresql", "sqlite")
            for store in order:
                db = server.create_database(f"bench_{round_no}") if store == "postgresql" \
                    else None
                runs[store].append(index_once(folder, db, args.photos))
                print(f"  round {round_no + 1} {store}: {runs[store][-1]['img_s']:.1f} img/s",
                      flush=True)
    finally:
        server.stop()
    medians = {store: statistics.median(r["img_s"] for r in rows)
               for store, rows in runs.items()}
    ratio = medians["postgresql"] / medians["sqlite"]
    result = {"photos": args.photos, "size": "1mp", "model": "tiny", "rounds": args.rounds,
              "cpus": os.cpu_count(), "runs": runs,
              "median_img_s": {k: round(v, 1) for k, v in medians.items()},
              "postgresql_vs_sqlite": round(ratio, 3), "target": ">= 0.8"}
    print(f"\n| store | median img/s |\n|---|---|\n| SQLite | {medians['sqlite']:.1f} |\n"
          f"| PostgreSQL | {medians['postgresql']:.1f} |\n\nPostgreSQL / SQLite: {ratio:.2f}× "
          f"(target ≥ 0.8×)")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
