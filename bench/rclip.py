"""clipdex against rclip 3.x, side by side: indexing a photo folder and a cold text query.

Run from the repository root (1,000 1 MP photos and 7 repeats: roughly 15 minutes on 2 cores,
plus 1-2 minutes the first time to install rclip and export its model):

    .venv/bin/python bench/rclip.py --json-out bench/results/rclip.json
    .venv/bin/python bench/rclip.py --quick            # a smoke run: tiny sizes, one repeat

What it does:
  * installs rclip 3.x from the package index into a virtual environment of its own
    (`--workdir`/venv; a benchmark-only dependency, not one of clipdex's);
  * makes rclip run offline on the same random-weight model clipdex is given
    (`ViT-B-32-256:random`): rclip 3 loads two ONNX files and a BPE vocabulary from
    `$RCLIP_DATADIR/ViT-B-32-256-datacomp_s34b_b86k/{visual,textual}.onnx` and
    `$RCLIP_DATADIR/tokenizer/bpe_simple_vocab_16e6.txt.gz` and only calls the Hugging Face hub
    for files that are missing (rclip/model_download.py, `download_onnx_model` and
    `download_tokenizer_vocab` return the local path when the file exists; `ensure_downloaded`
    only imports onnxruntime then). So the open_clip model `ViT-B-32-256` with random weights is
    exported here the way rclip's own scripts/convert_model.py exports the pretrained one
    (TorchScript exporter, opset 18, input "input" / output "output", dynamic batch axis, the
    multi-head-attention fast path off), in rclip's release form (`--rclip-onnx release`: the
    visual tower dynamically quantised to int8 with onnxruntime's quantize_dynamic on
    MatMul/Gemm, the text tower in fp16 with int64 tokens) or plain fp32 (`--rclip-onnx fp32`),
    and the vocabulary is copied from open_clip, as that script does. Every run gets a fresh
    RCLIP_DATADIR (rclip keeps its SQLite index there, db.sqlite3) with links to those files,
    and HF_HUB_OFFLINE=1;
  * generates the photos with bench/ingest.py's generator (photo-like JPEGs of a real photo's
    size and compression, cached under --photos-dir and shared with bench/ingest.py);
  * times, alternating fresh processes, median of --repeats:
      - indexing: rclip's first run in the folder (rclip has no index-only command: its first
        query in a directory indexes it, then answers the query) against `clipdex --home NEW
        index FOLDER --model ViT-B-32-256:random --json`, each into an empty index. Reported
        as images / process wall time (spawn to exit; rclip's includes its one query) and as
        images / in-process indexing time (rclip: `RClip.ensure_index`, timed by a wrapper that
        then calls rclip's own main(); clipdex: the report's total_seconds, model load
        included);
      - a cold text query on the indexed library: `rclip --no-indexing "red circle"` (and
        plain `rclip "red circle"`, which first re-checks every file of the folder against its
        index, rclip's default) against `clipdex --home H search "red circle"`: the whole
        process from spawn to exit, and its peak RSS (os.wait4's ru_maxrss of that child).
Figures from a shared machine are noisy: compare ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "bench"))  # bench/ingest.py's photo generator

RCLIP_SPEC = "rclip>=3,<4"
ARCH = "ViT-B-32-256"  # open_clip's name; rclip ships ViT-B-32-256 / datacomp_s34b_b86k
CLIPDEX_MODEL = f"{ARCH}:random"
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # rclip/model_download.py MODEL_SUBDIR
RCLIP_VOCAB = "tokenizer/bpe_simple_vocab_16e6.txt.gz"  # rclip/model_download.py TOKENIZER_VOCAB
IMAGE_SIZE = 256
CONTEXT_LENGTH = 77
OPSET = 18
QUERY = "red circle"
TOP = 10
EXPORT_VERSION = 1  # bump when the export changes: cached exports are redone
ONNX_VARIANTS = {  # --rclip-onnx: which exported file rclip loads as visual.onnx / textual.onnx
    "release": ("visual.int8.onnx", "textual.fp16.onnx"),
    "fp32": ("visual.fp32.onnx", "textual.fp32.onnx"),
}


# --- rclip's environment ----------------------------------------------------------------------
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_rclip(venv: Path) -> str | None:
    """The rclip version installed in `venv`, or None."""
    python = venv_python(venv)
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                           "print(version('rclip'))"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_rclip(venv: Path, spec: str, pip_args: list[str]) -> dict:
    """rclip 3.x in a virtual environment of its own; installed with pip when missing."""
    version = installed_rclip(venv)
    if version is None:
        if sys.version_info >= (3, 14) or sys.version_info < (3, 11):
            raise SystemExit(f"rclip 3 needs Python 3.11-3.13; this is {platform.python_version()}"
                             f": pass --rclip-venv to an environment that has rclip 3.x")
        log(f"installing {spec} into {venv} (a benchmark-only environment) ...")
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"could not create a virtual environment at {venv}: "
                             f"{made.stderr.strip()[-1500:]}")
        pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check",
               *pip_args, spec]
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                             if not line.startswith("WARNING: Location"))[-3000:]
            raise SystemExit(
                f"pip could not install {spec!r} into {venv} (exit {done.returncode}).\n"
                f"command: {' '.join(pip)}\n--- pip's output (end) ---\n{tail}\n---\n"
                f"rclip comes from the package index pip is configured with (`pip config list`;"
                f" `pip download rclip --no-deps` tests it). Extra pip options: --pip-arg; an "
                f"environment that already has rclip 3.x: --rclip-venv PATH.")
        version = installed_rclip(venv)
    if not version or not version.startswith("3."):
        raise SystemExit(f"{venv} has rclip {version!r}; this benchmark is written for rclip 3.x "
                         f"(delete that folder to reinstall, or pass --rclip-venv)")
    versions = subprocess.run(
        [str(venv_python(venv)), "-c", "import json, platform; from importlib.metadata import "
         "version as v; print(json.dumps({'rclip': v('rclip'), 'onnxruntime': v('onnxruntime'),"
         " 'numpy': v('numpy'), 'pillow': v('pillow'), 'python': platform.python_version()}))"],
        capture_output=True, text=True, check=True).stdout
    return json.loads(versions)


# --- the model rclip loads --------------------------------------------------------------------
EXPORT_CODE = r"""
import json, logging, shutil, sys, time, warnings
from pathlib import Path
import numpy as np, open_clip, torch

out, arch, seed, size, ctx, opset = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
out.mkdir(parents=True, exist_ok=True)
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.simplefilter("ignore")
torch.manual_seed(seed)
model = open_clip.create_model(arch, pretrained=None).eval()  # random weights

class Visual(torch.nn.Module):  # rclip's scripts/convert_model.py _VisualWrapper
    def __init__(self, visual):
        super().__init__()
        self.visual = visual
    def forward(self, x):
        return self.visual(x)

class Textual(torch.nn.Module):  # rclip's _TextualWrapper
    def __init__(self, clip_model):
        super().__init__()
        self.clip_model = clip_model
    def forward(self, x):
        return self.clip_model.encode_text(x)

def export(module, dummy, path):
    torch.backends.mha.set_fastpath_enabled(False)  # as rclip's _disable_mha_fastpath
    torch.onnx.export(module.eval(), (dummy,), str(path), input_names=["input"],
                      output_names=["output"], dynamo=False, opset_version=opset,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})

started = time.perf_counter()
export(Visual(model.visual), torch.randn(1, 3, size, size), out / "visual.fp32.onnx")
export(Textual(model), torch.zeros(1, ctx, dtype=torch.long), out / "textual.fp32.onnx")
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(str(out / "visual.fp32.onnx"), str(out / "visual.int8.onnx"),
                 weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
half = open_clip.create_model(arch, pretrained=None)
half.load_state_dict(model.state_dict())
half = half.to(torch.float16).eval()
export(Textual(half), torch.zeros(1, ctx, dtype=torch.long), out / "textual.fp16.onnx")

# verify the fp32 files against torch, as rclip's verify_onnx does (batch 2)
import onnxruntime as ort
image = torch.randn(2, 3, size, size)
tokens = torch.zeros(2, ctx, dtype=torch.long)
tokens[:, 0], tokens[0, 1], tokens[1, 1], tokens[:, 2] = 49406, 320, 539, 49407
with torch.no_grad():
    want = {"visual": model.visual(image).numpy(), "textual": model.encode_text(tokens).numpy()}
diffs = {}
for name, x in (("visual", image.numpy()), ("textual", tokens.numpy())):
    session = ort.InferenceSession(str(out / f"{name}.fp32.onnx"),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    diffs[f"{name}_fp32_max_abs_diff"] = float(np.max(np.abs(got - want[name])))
session = ort.InferenceSession(str(out / "visual.int8.onnx"), providers=["CPUExecutionProvider"])
(got,) = session.run(None, {"input": image.numpy()})
a, b = got / np.linalg.norm(got, axis=1, keepdims=True), want["visual"]
diffs["visual_int8_min_cosine"] = float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(b, axis=1)))
vocab = out / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
vocab.parent.mkdir(exist_ok=True)
shutil.copy2(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", vocab)
print(json.dumps({"export_s": time.perf_counter() - started, **diffs,
                  "torch": torch.__version__, "open_clip": open_clip.__version__,
                  "files_mb": {p.name: round(p.stat().st_size / 2**20, 1)
                               for p in sorted(out.glob("*.onnx"))}}))
"""


def export_models(directory: Path, seed: int, again: bool) -> dict:
    """The four ONNX files and the vocabulary, exported once and cached under `directory`."""
    marker = directory / "export.json"
    settings = {"version": EXPORT_VERSION, "arch": ARCH, "seed": seed, "opset": OPSET}
    if marker.exists() and not again:
        info = json.loads(marker.read_text())
        if info.get("settings") == settings and all(
                (directory / f).exists() for pair in ONNX_VARIANTS.values() for f in pair):
            return {**info, "cached": True}
    log(f"exporting {ARCH} with random weights (seed {seed}) to ONNX under {directory} ...")
    shutil.rmtree(directory, ignore_errors=True)
    done = subprocess.run([sys.executable, "-c", EXPORT_CODE, str(directory), ARCH, str(seed),
                           str(IMAGE_SIZE), str(CONTEXT_LENGTH), str(OPSET)],
                          capture_output=True, text=True, env=offline_env())
    if done.returncode != 0:
        raise SystemExit(f"exporting {ARCH} to ONNX failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    info = {"settings": settings, **json.loads(done.stdout.strip().splitlines()[-1])}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "cached": False}


def make_datadir(path: Path, models: Path, visual: str, textual: str) -> Path:
    """An empty RCLIP_DATADIR whose model files are links to the exported ones."""
    shutil.rmtree(path, ignore_errors=True)
    (path / RCLIP_MODEL_SUBDIR).mkdir(parents=True)
    (path / RCLIP_MODEL_SUBDIR / "visual.onnx").symlink_to(models / visual)
    (path / RCLIP_MODEL_SUBDIR / "textual.onnx").symlink_to(models / textual)
    (path / "tokenizer").mkdir()
    (path / RCLIP_VOCAB).symlink_to(models / RCLIP_VOCAB)
    return path


PROBE_CODE = r"""
import json, sys
from PIL import Image
from rclip import model_download
from rclip.model import Model
model = Model()
model.ensure_downloaded()  # finds every file locally: no hub call
text = model.compute_text_features(["red circle", "a dog"])
image = model.compute_image_features([Image.new("RGB", (320, 240), "red")], for_indexing=True)
sessions = {"textual": model._session_text, "visual": model._session_visual}
print(json.dumps({
    "text_shape": list(text.shape), "image_shape": list(image.shape),
    "io": {name: {"inputs": [(i.name, i.type, i.shape) for i in s.get_inputs()],
                  "outputs": [(o.name, o.type, o.shape) for o in s.get_outputs()]}
           for name, s in sessions.items()},
    "huggingface_hub_imported": "huggingface_hub" in sys.modules,
    "datadir_files": {"visual": model_download.download_visual_query_model(),
                      "textual": model_download.download_textual_model(),
                      "vocab": model_download.download_tokenizer_vocab()}}))
"""


def probe_rclip(venv: Path, models: Path, visual: str, textual: str, scratch: Path) -> dict:
    """Load both towers through rclip's own loader and encode a text and an image, offline."""
    datadir = make_datadir(scratch / "probe-datadir", models, visual, textual)
    done = subprocess.run([str(venv_python(venv)), "-c", PROBE_CODE], capture_output=True,
                          text=True, env=rclip_env(datadir))
    shutil.rmtree(datadir, ignore_errors=True)
    if done.returncode != 0:
        return {"ok": False, "returncode": done.returncode, "stderr": done.stderr[-2000:]}
    return {"ok": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def choose_rclip_files(args: argparse.Namespace, models: Path) -> tuple[str, str, dict]:
    """The files rclip will load, after checking that it loads them; notes what fell back."""
    visual, textual = ONNX_VARIANTS[args.rclip_onnx]
    probe = probe_rclip(args.rclip_venv, models, visual, textual, args.workdir)
    notes = []
    if not probe["ok"] and textual != "textual.fp32.onnx":
        crashed = probe["returncode"]
        notes.append(
            f"onnxruntime could not open the fp16 text tower ({textual}) with rclip's session "
            f"options (exit {crashed}{' = SIGSEGV' if crashed == -11 else ''}); the text tower "
            f"runs in fp32 instead (textual.fp32.onnx). On the machine this was written on "
            f"(onnxruntime 1.24.4-1.32.0, x86-64 with AVX-512), an fp16 Transpose -> MatMul pair "
            f"crashes session creation at the default ORT_ENABLE_ALL optimisation level")
        log("  " + notes[-1])
        textual = "textual.fp32.onnx"
        probe = probe_rclip(args.rclip_venv, models, visual, textual, args.workdir)
    if not probe["ok"]:
        raise SystemExit(f"rclip cannot load the exported model ({visual}, {textual}): exit "
                         f"{probe['returncode']}\n{probe['stderr']}")
    if probe["huggingface_hub_imported"]:
        notes.append("rclip imported huggingface_hub while loading: a file was not found locally")
    return visual, textual, {"probe": probe, "notes": notes}


# --- processes --------------------------------------------------------------------------------
@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def measured(command: list[str], *, cwd: Path | None = None, env: dict | None = None) -> Run:
    """Run a fresh process; its wall time from spawn to exit and its own peak RSS (wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Run(wall, usage.ru_maxrss / 1024, process.returncode,
                   out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def checked(run: Run, what: str, ok: tuple[int, ...] = (0,)) -> Run:
    if run.returncode not in ok:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return run


def offline_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLIPDEX_", "RCLIP_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_MININTERVAL="1")
    return env


def rclip_env(datadir: Path) -> dict:
    return {**offline_env(), "RCLIP_DATADIR": str(datadir)}


RCLIP_INDEX_CODE = r"""
import json, os, sys, time
from rclip import main as rclip_main
spans = {}
ensure_index = rclip_main.RClip.ensure_index
def timed_ensure_index(self, directory):
    started = time.perf_counter()
    try:
        return ensure_index(self, directory)
    finally:
        spans["index_s"] = time.perf_counter() - started
rclip_main.RClip.ensure_index = timed_ensure_index
sys.argv = ["rclip", *sys.argv[1:]]
try:
    rclip_main.main()
finally:
    spans["huggingface_hub_imported"] = "huggingface_hub" in sys.modules
    with open(os.environ["BENCH_RCLIP_SPANS"], "w") as f:
        json.dump(spans, f)
"""


def rclip_index(args, folder: Path, datadir: Path, models: Path, files: tuple[str, str]) -> dict:
    """rclip's first run in `folder` with an empty index: it indexes, then answers one query."""
    make_datadir(datadir, models, *files)
    spans_file = datadir / "bench-spans.json"
    env = {**rclip_env(datadir), "BENCH_RCLIP_SPANS": str(spans_file)}
    command = [str(venv_python(args.rclip_venv)), "-c", RCLIP_INDEX_CODE, "--filepath-only",
               "--top", str(TOP), "--indexing-batch-size", str(args.rclip_batch), QUERY]
    run = checked(measured(command, cwd=folder, env=env), "rclip indexing run")
    spans = json.loads(spans_file.read_text())
    with sqlite3.connect(datadir / "db.sqlite3") as conn:
        rows = conn.execute("SELECT COUNT(*) FROM images WHERE deleted IS NULL").fetchone()[0]
    if rows != args.images:
        raise SystemExit(f"rclip indexed {rows} of {args.images} photos:\n{run.stderr[-2000:]}")
    return {"wall_s": run.wall_s, "in_process_s": spans["index_s"],
            "peak_rss_mb": run.peak_rss_mb, "disk_bytes": tree_bytes(datadir, "db.sqlite3*"),
            "huggingface_hub_imported": spans["huggingface_hub_imported"]}


def clipdex_index(args, folder: Path, home: Path) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    command = [clipdex_executable(), "--home", str(home), "--quiet", "index", str(folder),
               "--model", CLIPDEX_MODEL, "--json"]
    run = checked(measured(command, env=offline_env()), "clipdex index")
    report = json.loads(run.stdout)
    if report["new"] != args.images:
        raise SystemExit(f"clipdex indexed {report['new']} of {args.images} photos:\n"
                         f"{run.stdout[-2000:]}")
    export_s = report.get("export_seconds") or 0.0  # the query models' one-off ONNX export
    return {"wall_s": run.wall_s, "in_process_s": report["total_seconds"],
            "embed_s": report["seconds"], "model_load_s": report["model_load_seconds"],
            "export_s": export_s, "queries": report.get("queries"),
            "runtime": report.get("runtime"),
            "peak_rss_mb": run.peak_rss_mb,
            "disk_bytes": tree_bytes(home, "library.db*") + tree_bytes(home, "vectors/**/*"),
            "model_cache_bytes": tree_bytes(home, "**/*") - tree_bytes(home, "library.db*")
            - tree_bytes(home, "vectors/**/*")}


def query_commands(args, folder: Path, datadir: Path, home: Path) -> dict[str, dict]:
    rclip = str(args.rclip_venv / "bin" / "rclip")
    return {
        "rclip_no_indexing": {"command": [rclip, "--no-indexing", "--filepath-only", "--top",
                                          str(TOP), QUERY],
                              "cwd": folder, "env": rclip_env(datadir)},
        "rclip_default": {"command": [rclip, "--filepath-only", "--top", str(TOP), QUERY],
                          "cwd": folder, "env": rclip_env(datadir)},
        "clipdex": {"command": [clipdex_executable(), "--home", str(home), "search", QUERY,
                                "--top", str(TOP)],
                    "cwd": None, "env": offline_env()},
    }


def query_run(name: str, spec: dict) -> dict:
    run = checked(measured(spec["command"], cwd=spec["cwd"], env=spec["env"]), f"{name} query")
    if not run.stdout.strip():
        raise SystemExit(f"{name} printed no results:\n{run.stderr[-2000:]}")
    return {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb}


def clipdex_executable() -> str:
    beside = Path(sys.executable).parent / "clipdex"
    found = str(beside) if beside.exists() else shutil.which("clipdex")
    if not found:
        raise SystemExit("the `clipdex` command is not installed (pip install -e .)")
    return found


def clipdex_stats(home: Path) -> dict:
    done = subprocess.run([clipdex_executable(), "--home", str(home), "stats", "--json"],
                          capture_output=True, text=True, env=offline_env())
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}


def tree_bytes(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file() and not p.is_symlink())


def read_all(paths) -> None:
    """Read files once so every timed run finds them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


# --- the benchmark ----------------------------------------------------------------------------
def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench(args: argparse.Namespace) -> dict:
    from ingest import photo_folder  # bench/ingest.py: photo-like JPEGs, cached

    env = {"cpus": os.cpu_count(), "load_start": _load(), "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version()}
    from cold_query import compile_bytecode  # rclip's pip install has its bytecode too

    env["clipdex_bytecode"] = compile_bytecode()
    rclip_versions = ensure_rclip(args.rclip_venv, args.rclip_spec, args.pip_arg)
    log(f"rclip {rclip_versions['rclip']} (onnxruntime {rclip_versions['onnxruntime']}) in "
        f"{args.rclip_venv}")
    models = args.workdir / "models"
    export = export_models(models, args.seed, args.reexport)
    visual, textual, loaded = choose_rclip_files(args, models)
    log(f"rclip loads {visual} and {textual} offline ({RCLIP_MODEL_SUBDIR}/ in a fresh "
        f"RCLIP_DATADIR per run)")
    folder = photo_folder(args.photos_dir, args.size, args.images)
    photos = sorted(folder.glob("*.jpg"))
    if len(photos) != args.images:
        raise SystemExit(f"{folder} holds {len(photos)} photos, not {args.images}")
    read_all([*photos, models / visual, models / textual])
    runs_dir = args.workdir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)

    log(f"== indexing {args.images} {args.size} photos, {args.repeats} alternating repeats")
    index_runs: dict[str, list[dict]] = {"rclip": [], "clipdex": []}
    datadir, home = runs_dir / "rclip-datadir", runs_dir / "clipdex-home"
    # As rclip's ONNX files are laid out before its runs, clipdex's first index on a machine
    # exports the model (to its per-user cache); the timed runs are those that follow.
    first = clipdex_index(args, folder, home)
    log(f"  first clipdex index (not in the medians): {first['wall_s']:.1f} s wall, "
        f"export {first['export_s']:.1f} s, queries {first['queries']}, "
        f"runtime {first['runtime']}")
    for repeat in range(args.repeats):
        order = ("rclip", "clipdex") if repeat % 2 == 0 else ("clipdex", "rclip")
        for tool in order:
            row = (rclip_index(args, folder, datadir, models, (visual, textual))
                   if tool == "rclip" else clipdex_index(args, folder, home))
            index_runs[tool].append(row)
            log(f"  {repeat + 1}/{args.repeats} {tool:7s} {row['wall_s']:6.1f} s wall, "
                f"{args.images / row['wall_s']:5.1f} img/s, peak RSS {row['peak_rss_mb']:.0f} MB")
    stats = clipdex_stats(home)

    log(f"== cold query {QUERY!r} on the indexed library, {args.repeats} alternating repeats "
        f"(+{args.query_warmup} unreported warm-up each)")
    commands = query_commands(args, folder, datadir, home)
    names = list(commands)
    for name in names:
        for _ in range(args.query_warmup):
            query_run(name, commands[name])
    query_runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            row = query_run(name, commands[name])
            query_runs[name].append(row)
            log(f"  {repeat + 1}/{args.repeats} {name:17s} {row['wall_s']:5.2f} s, "
                f"peak RSS {row['peak_rss_mb']:.0f} MB")
    env["load_end"] = _load()

    summary = summarise(args, index_runs, query_runs)
    result = {
        "environment": env,
        "settings": {"images": args.images, "size": args.size, "repeats": args.repeats,
                     "query": QUERY, "top": TOP, "clipdex_model": CLIPDEX_MODEL,
                     "rclip_model": f"{ARCH} (open_clip, random weights, seed {args.seed}) "
                                    f"exported to ONNX like rclip's scripts/convert_model.py",
                     "rclip_onnx": args.rclip_onnx, "rclip_files": [visual, textual],
                     "rclip_indexing_batch_size": args.rclip_batch, "photos": str(folder)},
        "rclip": {**rclip_versions, **loaded, "export": export},
        "clipdex": {"stats": stats},
        "summary": summary,
        "index_runs": index_runs, "clipdex_first_index": first,
        "query_runs": query_runs,
        "commands": {
            "rclip_index": f"cd {folder} && RCLIP_DATADIR=<fresh> rclip --filepath-only --top "
                           f"{TOP} --indexing-batch-size {args.rclip_batch} {QUERY!r} "
                           f"(through a wrapper that times RClip.ensure_index)",
            "clipdex_index": f"clipdex --home <fresh> --quiet index {folder} --model "
                             f"{CLIPDEX_MODEL} --json",
            **{name: " ".join(spec["command"]) for name, spec in commands.items()}},
    }
    if not args.keep:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return result


def summarise(args, index_runs: dict, query_runs: dict) -> dict:
    n = args.images
    out = {}
    for tool, runs in index_runs.items():
        out[f"{tool}_index_wall_s"] = median(runs, "wall_s")
        out[f"{tool}_index_img_s"] = statistics.median(n / r["wall_s"] for r in runs)
        out[f"{tool}_index_in_process_img_s"] = statistics.median(n / r["in_process_s"]
                                                                  for r in runs)
        out[f"{tool}_index_peak_rss_mb"] = median(runs, "peak_rss_mb")
        out[f"{tool}_disk_bytes_per_image"] = runs[-1]["disk_bytes"] / n
    clipdex = index_runs["clipdex"]
    out["clipdex_index_export_s"] = median(clipdex, "export_s")
    out["clipdex_index_in_process_no_export_img_s"] = statistics.median(
        n / (r["in_process_s"] - r["export_s"]) for r in clipdex)
    out["clipdex_model_cache_bytes"] = clipdex[-1]["model_cache_bytes"]
    for name, runs in query_runs.items():
        out[f"{name}_query_wall_s"] = median(runs, "wall_s")
        out[f"{name}_query_peak_rss_mb"] = median(runs, "peak_rss_mb")
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    out["ratios_clipdex_over_rclip"] = {
        "index_img_s": ratio(out["clipdex_index_img_s"], out["rclip_index_img_s"]),
        "index_in_process_img_s": ratio(out["clipdex_index_in_process_img_s"],
                                        out["rclip_index_in_process_img_s"]),
        "index_in_process_no_export_img_s": ratio(
            out["clipdex_index_in_process_no_export_img_s"],
            out["rclip_index_in_process_img_s"]),
        "index_peak_rss": ratio(out["clipdex_index_peak_rss_mb"], out["rclip_index_peak_rss_mb"]),
        "query_wall_vs_no_indexing": ratio(out["clipdex_query_wall_s"],
                                           out["rclip_no_indexing_query_wall_s"]),
        "query_wall_vs_default": ratio(out["clipdex_query_wall_s"],
                                       out["rclip_default_query_wall_s"]),
        "query_peak_rss": ratio(out["clipdex_query_peak_rss_mb"],
                                out["rclip_no_indexing_query_peak_rss_mb"]),
        "disk_per_image": ratio(out["clipdex_disk_bytes_per_image"],
                                out["rclip_disk_bytes_per_image"]),
    }
    return out


def markdown(result: dict) -> str:
    s, env, cfg = result["summary"], result["environment"], result["settings"]
    r = s["ratios_clipdex_over_rclip"]

    def row(label, rclip, clipdex, ratio, fmt):
        cells = [fmt.format(rclip), fmt.format(clipdex),
                 "n/a" if ratio is None else f"{ratio:.2f}x"]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        f"rclip {result['rclip']['rclip']} (onnxruntime {result['rclip']['onnxruntime']}, "
        f"{' + '.join(cfg['rclip_files'])}) vs clipdex ({cfg['clipdex_model']}), "
        f"{cfg['images']} {cfg['size']} photos, median of {cfg['repeats']} alternating fresh "
        f"processes; {env['cpus']} cores, load average {env['load_start']} -> "
        f"{env['load_end']}. Shared machine: compare ratios, not absolute times.", "",
        "| measure | rclip | clipdex | clipdex / rclip |", "|---|---|---|---|",
        row("index: img/s, process wall (spawn to exit; rclip's includes one query)",
            s["rclip_index_img_s"], s["clipdex_index_img_s"], r["index_img_s"], "{:.1f}"),
        row("index: img/s, in-process (rclip ensure_index; clipdex total_seconds)",
            s["rclip_index_in_process_img_s"], s["clipdex_index_in_process_img_s"],
            r["index_in_process_img_s"], "{:.1f}"),
        *([row("index: img/s, in-process, clipdex without its one-off query-model export "
               f"(median {s['clipdex_index_export_s']:.1f} s)",
               s["rclip_index_in_process_img_s"], s["clipdex_index_in_process_no_export_img_s"],
               r["index_in_process_no_export_img_s"], "{:.1f}")]
          if s["clipdex_index_export_s"] else []),
        row("index: process wall s", s["rclip_index_wall_s"], s["clipdex_index_wall_s"],
            None if not s["rclip_index_wall_s"] else
            s["clipdex_index_wall_s"] / s["rclip_index_wall_s"], "{:.1f}"),
        row("index: peak RSS MB", s["rclip_index_peak_rss_mb"], s["clipdex_index_peak_rss_mb"],
            r["index_peak_rss"], "{:.0f}"),
        row("cold query s (rclip --no-indexing)", s["rclip_no_indexing_query_wall_s"],
            s["clipdex_query_wall_s"], r["query_wall_vs_no_indexing"], "{:.2f}"),
        row("cold query s (rclip default: re-checks the folder first)",
            s["rclip_default_query_wall_s"], s["clipdex_query_wall_s"],
            r["query_wall_vs_default"], "{:.2f}"),
        row("cold query peak RSS MB (rclip --no-indexing)",
            s["rclip_no_indexing_query_peak_rss_mb"], s["clipdex_query_peak_rss_mb"],
            r["query_peak_rss"], "{:.0f}"),
        row("index on disk, bytes per image (rclip db.sqlite3; clipdex library.db + vectors/)",
            s["rclip_disk_bytes_per_image"], s["clipdex_disk_bytes_per_image"],
            r["disk_per_image"], "{:.0f}"),
        "", "Ratios above 1 mean clipdex is faster for img/s, slower for seconds, bigger for MB "
            "and bytes.",
    ]
    if s["clipdex_model_cache_bytes"]:
        cache_mb = s["clipdex_model_cache_bytes"] / 2**20
        lines.append(f"clipdex's library home also holds {cache_mb:.0f} MB of model files "
                     f"(its exported query models); rclip's ONNX files live outside its index.")
    lines += [f"Note: {note}" for note in result["rclip"]["notes"]]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: .venv/bin/python bench/rclip.py --images 1000 --repeats 7 "
               "--json-out bench/results/rclip.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, help="photos in the folder (default 1000; "
                                                   "--quick: 8)")
    parser.add_argument("--repeats", type=int, help="alternating runs per tool, median "
                                                    "reported (default 7; --quick: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 8 photos, 1 repeat, no query warm-up")
    parser.add_argument("--size", choices=("1mp", "12mp"), default="1mp",
                        help="photo size (bench/ingest.py's: 1152x864 or 4000x3000)")
    parser.add_argument("--rclip-onnx", choices=sorted(ONNX_VARIANTS), default="release",
                        help="the form of the ONNX files rclip loads: 'release' as rclip's "
                             "scripts/convert_model.py publishes them (int8 visual, fp16 text; "
                             "fp32 text where onnxruntime cannot open fp16) or plain 'fp32'")
    parser.add_argument("--rclip-batch", type=int, default=8,
                        help="rclip's --indexing-batch-size (default 8, rclip's own default)")
    parser.add_argument("--query-warmup", type=int, help="unreported query runs per command "
                                                         "before the timed ones (default 1)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-bench/rclip"),
                        help="rclip's environment, the exported model and the run folders")
    parser.add_argument("--photos-dir", type=Path, default=Path("/tmp/clipdex-bench"),
                        help="where the photos are generated and cached (bench/ingest.py's "
                             "--workdir)")
    parser.add_argument("--rclip-venv", type=Path,
                        help="rclip's virtual environment (default WORKDIR/venv; created and "
                             "filled with pip when it has no rclip)")
    parser.add_argument("--rclip-spec", default=RCLIP_SPEC, help=f"what pip installs "
                                                                 f"(default {RCLIP_SPEC!r})")
    parser.add_argument("--pip-arg", action="append", default=[],
                        help="an extra argument for pip install (repeatable), e.g. "
                             "--pip-arg=--index-url=URL")
    parser.add_argument("--seed", type=int, default=0, help="seed of rclip's random weights")
    parser.add_argument("--reexport", action="store_true", help="export the ONNX files again")
    parser.add_argument("--keep", action="store_true",
                        help="keep the last rclip datadir and clipdex home (WORKDIR/runs)")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.images = args.images or (8 if args.quick else 1000)
    args.repeats = args.repeats or (1 if args.quick else 7)
    if args.query_warmup is None:
        args.query_warmup = 0 if args.quick else 1
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be at least 1")
    args.rclip_venv = args.rclip_venv or args.workdir / "venv"
    args.workdir = args.workdir.resolve()
    args.photos_dir = args.photos_dir.resolve()
    args.rclip_venv = args.rclip_venv.resolve()
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = bench(args)
    print(markdown(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
