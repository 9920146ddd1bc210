"""Run the benchmarks and print one Markdown table of clipdex against side-by-side baselines.

    .venv/bin/python bench/run_all.py                  # ingest, query, expansion: ~16 min
    .venv/bin/python bench/run_all.py --large          # adds the 1M-vector rows, ~25 min
    .venv/bin/python bench/run_all.py --report-only    # rebuild the table from bench/results/
    .venv/bin/python bench/run_all.py --update-readme  # and write it into README.md

Each benchmark runs in its own process and writes JSON under bench/results/; the table is built
from those files, so every row names the command that produced it. The baselines are measured in
the same run as the figure they are compared with: ingestion against a naive loop (full-size
decode, open_clip preprocess, fp32 model, one loading thread), search against rclip's way (read
every vector BLOB from SQLite per query, dot products, sort in Python). On a shared machine the
absolute times move; the ratios are the claim.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = ".venv/bin/python"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


def jobs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(result file, command) for each benchmark this run includes."""
    tiny_sizes = "10k,100k,1m" if args.large else "10k,100k"
    vit_sizes = "10k,1m" if args.large else "10k"
    out = [
        ("ingest.json", ["bench/ingest.py", "--json-out", "bench/results/ingest.json"]),
        ("query.json", ["bench/query.py", "--sizes", tiny_sizes,
                        "--json-out", "bench/results/query.json"]),
        ("query-vit.json", ["bench/query.py", "--model", "ViT-B-32:random", "--sizes", vit_sizes,
                            "--json-out", "bench/results/query-vit.json"]),
        ("expansion.json", ["bench/expansion.py", "--json-out", "bench/results/expansion.json"]),
    ]
    if args.index_choice:
        sizes = "10000,100000,1000000" if args.large else "10000,100000"
        out.append(("index_choice.json", ["bench/index_choice.py", "--sizes", sizes,
                                          "--json-out", "bench/results/index_choice.json"]))
    return out


def run(job: list[str]) -> None:
    print(f"$ {PY} {' '.join(job)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, *job], cwd=ROOT, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def _load(name: str) -> dict | list | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _cmd(name: str, commands: dict[str, str]) -> str:
    return f"`{commands.get(name, '?')}`"


def _x(value: float) -> str:
    return f"{value:.2f}×" if value < 10 else f"{value:.0f}×"


def table(commands: dict[str, str]) -> str:
    rows: list[list[str]] = []
    ingest = _load("ingest.json")
    if ingest:
        for result in ingest["results"]:
            model = result["model"]
            chosen = result["chosen_precision"]
            fp32 = next(r for r in result["precision"]
                        if r["precision"] == "fp32" and r.get("batch") == 64)
            image_side = {"int8-image": "int8", "int8-text": "fp32"}.get(chosen, chosen)
            mine = next(r for r in result["precision"]
                        if r["precision"] == image_side and r.get("batch") == 64)
            rows.append([f"embed, model only, {model} ({chosen}, batch 64; cos ≥ "
                         f"{mine['cos_min']:.4f} vs fp32)", f"{mine['img_s']:.1f} img/s",
                         f"{fp32['img_s']:.1f} img/s (open_clip fp32)",
                         _x(mine["img_s"] / fp32["img_s"]), _cmd("ingest.json", commands)])
            for p in result["pipeline"]:
                rows.append([f"index photos end to end, {model}, {p['size']} JPEGs",
                             f"{p['e2e_img_s']:.1f} img/s ({p['e2e_of_bound']:.2f}× the 2-core "
                             f"bound {p['bound_img_s']:.1f})",
                             f"{p['naive_img_s']:.1f} img/s (naive loop)",
                             _x(p["e2e_over_naive"]), _cmd("ingest.json", commands)])
    for name in ("query.json", "query-vit.json"):
        query = _load(name)
        if not query:
            continue
        model = query["environment"].get("model", "tiny")
        for r in query["results"]:
            n = f"{r['vectors']:,}"
            rows.append([f"vector search + hydrate, {n} vectors ({r['index']['type']}, "
                         f"recall@10 {r['recall_at_10']:.3f})",
                         f"{r['search_ms'] + r['hydrate_ms']:.2f} ms",
                         f"{r['brute_force_ms']:.0f} ms (rclip-style brute force)",
                         _x(r["brute_over_search"]), _cmd(name, commands)])
            rows.append([f"warm text query, {model}, {n} vectors (encode {r['encode_ms']:.1f} "
                         f"+ search {r['search_ms']:.1f} + hydrate {r['hydrate_ms']:.1f} ms)",
                         f"{r['total_ms']:.1f} ms",
                         f"{r['brute_force_ms'] + r['encode_ms']:.0f} ms (encode + brute force)",
                         _x(r["brute_plus_encode_over_total"]), _cmd(name, commands)])
            if "cold_stages" in r:
                st = r["cold_stages"]
                split = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f}" for k, v in st.items()
                                  if k != "wall_s")
                rows.append([f"cold CLI query, {model} ({r.get('cold_precision', '?')}), {n} "
                             f"vectors — stages in s: {split}", f"{r['cold_cli_s']:.2f} s", "—",
                             "—", _cmd(name, commands)])
            if "index_bytes_per_vector" in r:
                rows.append([f"disk per image, {n} vectors (index + store)",
                             f"{r['index_bytes_per_vector']:.0f} + "
                             f"{r['store_bytes_per_vector']:.0f} B",
                             "—", "—", _cmd(name, commands)])
    choice = _load("index_choice.json")
    if choice:
        largest = max(r["n"] for r in choice)
        good = [r for r in choice if r["n"] == largest and r["recall10"] >= 0.95]
        flat = next(r for r in choice if r["n"] == largest and r["index"] == "Flat")
        if good:
            best = min(good, key=lambda r: r["p50_ms"])
            rows.append([f"fastest index at recall@10 ≥ 0.95, {largest:,}×512 "
                         f"({best['index']} {best['knob']}, recall {best['recall10']:.3f}, "
                         f"{best['bytes_per_vector']:.0f} B/vector)",
                         f"{best['p50_ms']:.2f} ms p50", f"{flat['p50_ms']:.1f} ms (exact Flat)",
                         _x(flat["p50_ms"] / best["p50_ms"]), _cmd("index_choice.json", commands)])
    expansion = _load("expansion.json")
    if expansion:
        rows_by = {r["method"]: r for r in expansion["results"]}
        shipped = next(r for name, r in rows_by.items() if name.startswith("--expand"))
        low, high = shipped["delta_r1_ci"]
        rows.append([f"text→image R@1, tiny, {expansion['images']['test']} generated test "
                     f"images, {shipped['method']}; +{shipped.get('added_ms', 0):.1f} ms/query",
                     f"{100 * shipped['r1']:.1f}",
                     f"{100 * rows_by['none']['r1']:.1f} (no expansion)",
                     f"{100 * shipped['delta_r1']:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]",
                     _cmd("expansion.json", commands)])
    header = ["measure", "clipdex", "baseline, same run", "ratio", "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch "
            f"{torch.__version__}, {time.strftime('%Y-%m-%d')}; load average when this table "
            f"was written {load}")


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    if MARK_START not in content or MARK_END not in content:
        raise SystemExit(f"README.md has no {MARK_START} … {MARK_END} block to replace")
    head, rest = content.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    readme.write_text(f"{head}{MARK_START}\n{text}\n{MARK_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="include 1M-vector libraries")
    parser.add_argument("--index-choice", action="store_true",
                        help="also rerun bench/index_choice.py (10-30 min)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; build the table from bench/results/*.json")
    parser.add_argument("--update-readme", action="store_true",
                        help=f"write the table into README.md between {MARK_START} and "
                             f"{MARK_END}")
    args = parser.parse_args(argv)
    planned = jobs(args)
    commands = {name: f"{PY} {' '.join(job)}" for name, job in planned}
    commands.setdefault("index_choice.json",
                        f"{PY} bench/index_choice.py --sizes 10000,100000,1000000 "
                        f"--json-out bench/results/index_choice.json")
    if not args.report_only:
        for _, job in planned:
            run(job)
    for name in ("query.json", "query-vit.json"):  # name the sizes the figures came from
        found = _load(name)
        if found:
            sizes = ",".join(_size(r["vectors"]) for r in found["results"])
            model = found["environment"].get("model", "tiny")
            commands[name] = (f"{PY} bench/query.py" + (f" --model {model}" if model != "tiny"
                                                        else "")
                              + f" --sizes {sizes} --json-out bench/results/{name}")
    text = (f"Machine: {machine()}. Shared machine: compare the ratios, measured side by side "
            f"in one run, not absolute times.\n\n{table(commands)}")
    (RESULTS / "summary.md").write_text(text + "\n")
    print(text)
    if args.update_readme:
        update_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
