"""clipdex command line: parses, calls the library, formats. No logic lives here.

Heavy modules (torch, open_clip, faiss, PIL, even SQLAlchemy) are imported inside commands, so
`clipdex --help` answers instantly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

EXIT_PARTIAL = 3  # `index` finished but skipped unreadable files (like rsync's code 23)
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipdex")
    except PackageNotFoundError:
        return "0+unknown"


class ClipdexGroup(click.Group):
    """Turns domain errors into one-line messages with their exit status: usage problems exit
    2 (with the usage line), other failures their `exit_code` (1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            from index.errors import ClipdexError, UsageProblem  # not at import: --help is instant

            if isinstance(exc, UsageProblem):
                raise click.UsageError(str(exc), ctx) from None
            if isinstance(exc, ClipdexError):
                error = click.ClickException(str(exc))
                error.exit_code = exc.exit_code
                raise error from None
            raise


def _settings(ctx: click.Context, **flags: Any):
    """Settings from the global flags and the command's (flag > CLIPDEX_* > default)."""
    from index import Settings

    obj = ctx.find_root().obj
    return Settings.resolve(obj["home"], obj["db"], **flags)


def _library(ctx: click.Context, *, create: bool = True, **flags: Any):
    """The library, for writing (made when missing) or reading (`create=False`: never made)."""
    from index import Library

    return Library(_settings(ctx, **flags), create=create)


def _counting_bar(ctx: click.Context, unit: str, desc: str | None = None):
    """A tqdm bar on stderr (off with --quiet) and its `update(done, total, **postfix)`."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit=unit, disable=not _progress_enabled(ctx), file=sys.stderr,
               desc=desc)

    def update(done: int, total: int, **postfix: str) -> None:
        bar.total, bar.n = total, done
        if postfix:
            bar.set_postfix(postfix, refresh=True)
        else:
            bar.refresh()

    return bar, update


def _progress_enabled(ctx: click.Context) -> bool:
    return not ctx.find_root().obj["quiet"] and sys.stderr.isatty()


def shown(path: str) -> str:
    """A path as printable text: bytes of a non-UTF-8 name appear as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _emit_json(data: dict) -> None:
    # a non-UTF-8 file name holds lone surrogates: written as \udcNN escapes, which JSON
    # readers (Python's json, os.fsencode) turn back into the same bytes
    text = json.dumps(data, indent=2, ensure_ascii=False)
    click.echo(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")(f)


def model_options(f: Callable) -> Callable:
    f = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]),
                     envvar="CLIPDEX_PRECISION", show_envvar=True,
                     help="Model precision [default: auto]; auto uses int8 for each tower whose "
                          "int8 output matches fp32 on a probe (cosine >= 0.999), else fp32.")(f)
    return click.option(
        "--model", "-m", envvar="CLIPDEX_MODEL", metavar="SPEC",
        help="open_clip model: ARCH:TAG (default ViT-B-32:laion2b_s34b_b79k, downloaded once), "
             "hf-hub:ORG/REPO, local-dir:PATH, ARCH:/path/ckpt.pt, or `tiny` (offline, shipped). "
             "Fixed by a library's first use.")(f)


@click.group(cls=ClipdexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="clipdex")
@click.option("--home", type=click.Path(file_okay=False), envvar="CLIPDEX_HOME",
              help="Library folder [env CLIPDEX_HOME; default: the per-user data dir].")
@click.option("--db", metavar="URL", envvar="CLIPDEX_DB",
              help="SQLAlchemy URL of the metadata store [env CLIPDEX_DB; default: SQLite in "
                   "the library folder].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verbose", "-v", is_flag=True,
              help="Also show the logs and warnings of open_clip and the model hub "
                   "(downloads, retries), which are otherwise summed up in one message.")
@click.pass_context
def main(ctx: click.Context, home: str | None, db: str | None, quiet: bool,
         verbose: bool) -> None:
    """clipdex: search photos and captions with CLIP.

    \b
    Quick start (offline, with the small shipped model):
      clipdex scenes ~/clipdex-scenes --count 200
      clipdex index ~/clipdex-scenes --model tiny
      clipdex captions add ~/clipdex-scenes/captions.jsonl
      clipdex search "a red circle"
      clipdex caption ~/clipdex-scenes/scene_00000.jpg
    Or run everything at once: clipdex demo
    """
    if verbose:
        _log_to_stderr()
    ctx.obj = {"home": home, "db": db, "quiet": quiet}


def _log_to_stderr() -> None:
    """INFO logs on stderr; the library shows the hub's and open_clip's when INFO is on."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    # the hub prints through a handler of its own as well: once is enough
    logging.getLogger("huggingface_hub").propagate = False


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", "-n", type=click.IntRange(1), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(16, 4096), default=224, show_default=True,
              help="Image side in pixels.")
@click.option("--holdout", is_flag=True,
              help="Never draw the colour/shape pairs the tiny model was trained without.")
@click.pass_context
def scenes(ctx: click.Context, directory: Path, count: int, seed: int, size: int,
           holdout: bool) -> None:
    """Generate COUNT captioned synthetic scenes into DIRECTORY.

    Writes JPEG and PNG images plus captions.jsonl and captions.csv (keys path, caption),
    deterministically from --seed.
    """
    from tqdm import tqdm

    from index.synthetic.scenes import HOLDOUT, write_scenes

    with tqdm(total=count, unit="img", disable=not _progress_enabled(ctx), file=sys.stderr) as bar:
        write_scenes(directory, count, seed=seed, size=size,
                     exclude=HOLDOUT if holdout else (), progress=bar.update)
    click.echo(f"wrote {count} scenes and captions.jsonl/captions.csv to {directory}")


@main.command("index")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@model_options
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip files or folders matching GLOB (relative path or name); repeatable.")
@click.option("--hidden", "include_hidden", is_flag=True, help="Also index hidden files/folders.")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Decoder threads [default: one per core]; with --ray, each worker "
                   "decodes on its own CPU instead.")
@click.option("--retry-failed", is_flag=True,
              help="Retry every recorded failure, even files that have not changed.")
@click.option("--rehash", is_flag=True,
              help="Also hash files whose size and mtime are unchanged; re-embed any whose "
                   "content differs (reads every file).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Decode and embed on a Ray cluster (the `ray` extra): ADDRESS is its head's "
                   "HOST:PORT (as `ray start --head` prints), ray://HOST:PORT or auto; "
                   "without one, a local Ray instance for this run. Every node must see the "
                   "photos under the same paths.")
@click.option("--ray-workers", type=click.IntRange(1), metavar="N",
              help="Model workers on Ray [default: the cluster's CPUs, or GPUs with "
                   "--ray-gpus].")
@click.option("--ray-gpus", type=click.FloatRange(0, min_open=True), metavar="G",
              help="GPUs per model worker; decoding then runs in separate CPU workers.")
@click.option("--ray-decoders", type=click.IntRange(1), metavar="N",
              help="Separate decoder workers feeding the model workers [default: none on "
                   "CPUs; the CPUs left over with --ray-gpus].")
@json_option
@click.pass_context
def index_cmd(ctx: click.Context, paths: tuple[Path, ...], model: str | None, precision: str,
              exclude: tuple[str, ...], include_hidden: bool, workers: int | None,
              retry_failed: bool, rehash: bool, ray_address: str | None,
              ray_workers: int | None, ray_gpus: float | None, ray_decoders: int | None,
              as_json: bool) -> None:
    """Index the images under PATHS (incremental: only new or changed files are embedded).

    A file counts as changed when its size or mtime changed (--rehash also compares content).
    Moved files keep their vectors, vanished files are removed, unreadable files are recorded
    (see `clipdex failures`) and retried when they change, when the reason was a permission
    error, or with --retry-failed. Exits 3 while files under PATHS remain unindexed because
    they failed (now or before), 0 when everything is indexed, 130 when interrupted (Ctrl-C:
    every batch saved so far stays, and running it again continues from there).

    With --ray the scan, the plan and the commits stay in this process and decoding and
    embedding fan out over Ray workers (Ray Data), with the same outcome as without it.

    Photos are embedded on ONNX Runtime with the library's checked export of its model
    (made first when a new library is indexed); an update then never imports torch.
    CLIPDEX_RUNTIME=torch embeds on torch instead; --ray workers always do.
    """
    from tqdm import tqdm

    ray, folder = _ray_options(ray_address, ray_workers, ray_gpus, ray_decoders)
    if folder is not None:
        paths = (folder,) + paths  # `--ray photos/`: a folder, not an address
    if not paths:
        raise click.UsageError("Missing argument 'PATHS...'.")
    if ray is not None and ray.address is not None:
        from index.distributed import ray_session

        # join the cluster before the library is opened: a refusal writes nothing
        ctx.with_resource(ray_session(ray))
    library = _library(ctx)
    bar = tqdm(total=0, unit="img", disable=not _progress_enabled(ctx), file=sys.stderr,
               desc="embedding")
    saved = {"new": 0, "changed": 0}  # as of the last committed batch
    shown_desc = ["embedding"]  # the bar's description (a disabled tqdm keeps none)

    def progress(p) -> None:
        if p.phase == "index":  # rebuilding the vector index after the library grew
            shown_desc[0] = p.counts["index"]
            bar.set_description(p.counts["index"], refresh=True)
            return
        if p.phase == "metadata":  # photos indexed before metadata existed: headers only
            shown_desc[0] = "reading metadata"
            bar.set_description("reading metadata", refresh=False)
            bar.total, bar.n = p.total, p.done
            bar.set_postfix({}, refresh=True)
            return
        saved.update({k: p.counts.get(k, 0) for k in saved})
        if shown_desc[0] != "embedding":  # after "exporting the model…" (a new library)
            shown_desc[0] = "embedding"
            bar.set_description("embedding", refresh=False)
        if bar.total != p.total:
            bar.total = p.total
        bar.n = p.done
        bar.set_postfix({k: v for k, v in p.counts.items() if v}, refresh=True)

    try:
        report = library.index(paths, model=model, exclude=exclude, precision=precision,
                               include_hidden=include_hidden, workers=workers,
                               retry_failed=retry_failed, rehash=rehash, progress=progress,
                               ray=ray)
    except KeyboardInterrupt:
        bar.close()
        embedded = saved["new"] + saved["changed"]
        click.echo(f"\ninterrupted: {embedded} photo{'' if embedded == 1 else 's'} embedded "
                   f"and saved in this run; run the same command again to continue", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    finally:
        bar.close()
        library.close()
    data = report.as_dict()
    if as_json:
        _emit_json(data)
    else:
        click.echo(
            f"{report.new} new, {report.changed} changed, {report.unchanged} unchanged, "
            f"{report.moved} moved, {report.removed} removed, {report.failed} failed"
            + (f" ({report.skipped_failed} failed before, unchanged)" if report.skipped_failed
               else "") + f" in {report.total_seconds:.1f}s"
            + (f" (model load {report.model_load_seconds:.1f}s"
               + (", ONNX Runtime)" if report.runtime == "onnx" else ")")
               if report.model_load_seconds else ""))
        meta = report.metadata
        if meta.get("updated_without_embedding"):
            click.echo(f"metadata: read for {meta['updated_without_embedding']} indexed "
                       f"photos (not re-embedded)", err=True)
        if meta.get("unusable"):
            fields = ", ".join(f"{name} {n}" for name, n in meta["unusable"].items())
            click.echo(f"metadata: unusable values left empty: {fields}", err=True)
        if report.queries.startswith("exported"):
            click.echo(f"queries: {report.queries} to ONNX in {report.export_seconds:.1f}s "
                       f"(searches start without torch)", err=True)
        elif report.queries not in ("", "ready", "not needed"):
            click.echo(f"queries: {report.queries}", err=True)
        for path, reason in report.failures[:20]:
            click.echo(f"  failed: {shown(path)}: {reason}", err=True)
        if len(report.failures) > 20:
            click.echo(f"  … and {len(report.failures) - 20} more (clipdex failures)", err=True)
    if report.failures_remain:
        ctx.exit(EXIT_PARTIAL)


def _ray_options(address: str | None, workers: int | None, gpus: float | None,
                 decoders: int | None):
    """(RayOptions, a folder click took for the address) for `index --ray`, checked before
    the library is opened: a missing extra or an unreachable address is one line and writes
    nothing."""
    if address is None:
        if workers or gpus or decoders:
            raise click.UsageError("--ray-workers, --ray-gpus and --ray-decoders go with --ray")
        return None, None
    from index.distributed import RayOptions, check_address, looks_like_address

    folder = None
    if address != "local" and not looks_like_address(address):
        if not os.path.exists(address):  # neither a cluster address nor a folder
            raise click.BadParameter(f"{address!r} is not HOST:PORT, ray://HOST:PORT or auto",
                                     param_hint="'--ray'")
        folder, address = Path(address), "local"  # `--ray photos/`: a folder, not an address
    options = RayOptions(address=None if address == "local" else address, workers=workers,
                         gpus=gpus or 0.0,
                         decode="actors" if decoders else "auto", decoders=decoders)
    check_address(options.address)
    return options, folder


@main.group()
def captions() -> None:
    """Caption collections (CSV/TSV/JSONL/COCO) for image→caption and text→caption search."""


@captions.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "tsv", "jsonl", "coco"]),
              help="File format [default: from the file name].")
@click.option("--max-chars", type=click.IntRange(min=1), metavar="N",
              help="Cut captions longer than N characters [default: 4096].")
@model_options
@json_option
@click.pass_context
def captions_add(ctx: click.Context, file: Path, fmt: str | None, max_chars: int | None,
                 model: str | None, precision: str, as_json: bool) -> None:
    """Embed the captions in FILE into the library's caption index.

    CSV/TSV need a header with a caption column (caption/text) and optionally an image column
    (path/file_name/image); JSONL lines use the same keys; COCO uses images[].file_name and
    annotations[].caption. Captions whose image is indexed are linked to it. Adding the same
    file twice adds nothing. Bad lines are skipped and listed; NUL bytes are removed.
    """
    library = _library(ctx)
    bar, progress = _counting_bar(ctx, "caption")
    limit = {} if max_chars is None else {"max_chars": max_chars}  # none: the library's default
    try:
        report = library.add_captions(file, format=fmt, model=model, precision=precision,
                                      progress=progress, **limit)
    finally:
        bar.close()
        library.close()
    if as_json:
        _emit_json(report.as_dict())
        return
    click.echo(f"{report.added} added, {report.duplicates} duplicates, {report.linked} linked "
               f"to images, {report.skipped} skipped")
    if report.truncated or report.nul_stripped:
        click.echo(f"{report.truncated} cut to {report.max_chars} characters, "
                   f"{report.nul_stripped} with NUL bytes removed")
    for problem in report.problems[:20]:
        click.echo(f"  skipped: {problem}", err=True)


def _print_hits(result, *, as_json: bool, paths_only: bool) -> None:
    if as_json:
        _emit_json(result.as_dict())
        return
    if paths_only:  # the bytes of each name, as they are on disk, for xargs and scripts
        sys.stdout.flush()
        for hit in result.hits:
            if hit.path:
                sys.stdout.buffer.write(os.fsencode(hit.path) + b"\n")
        sys.stdout.buffer.flush()
        return
    if not result.hits:
        click.echo("no results", err=True)
        return
    # a date column when hits have camera times, or the order is by date (a ~ marks a date
    # that is the file's mtime), and a camera column when hits have cameras
    dated = result.query.sort != "relevance" or result.query.browse or any(
        h.meta and h.meta.get("taken_at_source") not in (None, "mtime") for h in result.hits)
    width = min(24, max((len(h.meta["camera"]) for h in result.hits
                         if h.meta and h.meta.get("camera")), default=0))
    for rank, hit in enumerate(result.hits, result.query.offset + 1):
        # 7.4f: -1.0000 to 1.0000 in one width, so negative scores stay in line
        score = f"{hit.score:7.4f}" if hit.score is not None else "      -"
        columns = [f"{rank:>3}", score]
        meta = hit.meta or {}
        if dated:
            when = (meta.get("taken_at") or "")[:16].replace("T", " ")
            mark = "~" if when and meta.get("taken_at_source") == "mtime" else " "
            columns.append(f"{when:<16}{mark}")
        if width:
            columns.append(f"{(meta.get('camera') or '')[:width]:<{width}}")
        if hit.kind == "image":
            columns.append(shown(hit.path))
        else:
            linked = f"  [{shown(hit.path)}]" if hit.path else ""
            columns.append(f"{hit.text}{linked}")
        click.echo("  ".join(columns))


def filter_options(f: Callable) -> Callable:
    for decorator in reversed([
        click.option("--after", metavar="WHEN",
                     help="Only photos taken at or after WHEN: YYYY, YYYY-MM, YYYY-MM-DD or "
                          "YYYY-MM-DDTHH:MM, as the camera's clock showed it."),
        click.option("--before", metavar="WHEN",
                     help="Only photos taken before WHEN (same forms; --after 2024-06-01 "
                          "--before 2024-07-01 is June 2024)."),
        click.option("--year", metavar="YYYY", help="Only photos taken in this year."),
        click.option("--month", metavar="YYYY-MM", help="Only photos taken in this month."),
        click.option("--camera", metavar="TEXT",
                     help="Only photos from a camera whose make/model contains TEXT "
                          "(case-insensitive): canon, 'iphone 13'."),
        click.option("--place", metavar="TEXT",
                     help="Only photos taken in a city, region or country matching TEXT "
                          "(accents and case ignored; or a country code such as PT)."),
        click.option("--near", metavar="LAT,LON[,KM]",
                     help="Only photos taken within KM (default 10) of a GPS position."),
        click.option("--type", "types", multiple=True, metavar="TYPE",
                     help="Only images of this format: jpeg, png, webp, gif, bmp, tiff, "
                          "heic, avif (repeatable, or comma-separated)."),
        click.option("--tag", "tags", multiple=True, metavar="LABEL",
                     help="Only images tagged LABEL by `clipdex tag` (repeatable: all)."),
        click.option("--sort", type=click.Choice(["relevance", "date", "-date"]),
                     default="relevance", show_default=True,
                     help="date: oldest first, -date: newest first. With a query, the --top "
                          "hits by relevance are shown in date order; with filters alone, "
                          "photos are listed newest first."),
    ]):
        f = decorator(f)
    return f


def search_options(f: Callable) -> Callable:
    for decorator in reversed([
        click.option("--top", "-k", "top", type=int, default=10, show_default=True,
                     help="Number of results."),
        click.option("--offset", type=int, default=0, help="Skip this many best results."),
        click.option("--threshold", type=float, help="Drop results scoring below this cosine."),
        click.option("--under", type=click.Path(file_okay=False),
                     help="Only images (or captions of images) below this folder (which "
                          "must exist)."),
        click.option("--dedup", is_flag=True, help="Collapse near-identical images."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]),
                     envvar="CLIPDEX_PRECISION",
                     help="Query encoder precision [default: auto: what the ONNX export chose "
                          "per tower; fp32 never runs int8]."),
    ]):
        f = decorator(f)
    return f


def expansion_options(f: Callable) -> Callable:
    from_default = "contrastive"  # = expansion.DEFAULT_METHOD (not imported: fast --help)
    for decorator in reversed([
        click.option("--expand", type=click.Choice(["contrastive", "prior", "meanshift", "ridge",
                                                    "pixels"]),
                     is_flag=False, flag_value=from_default, default=None,
                     help="Expand a text query towards images first: with the trained "
                          "contrastive map or diffusion prior (`clipdex prior train`), the "
                          "mean shift, the ridge map, or generated pixels. Alone (after the "
                          f"text): {from_default}."),
        click.option("--expand-samples", type=click.IntRange(1, 256), metavar="K",
                     help="Image-side samples per query (prior, pixels) [default: 4]."),
        click.option("--expand-weight", type=click.FloatRange(0, 1), metavar="A",
                     help="Share of the image side in the query, 0-1 [default: tuned]."),
        click.option("--expand-seed", type=int, metavar="S",
                     help="Sampling seed (prior, pixels) [default: 0]."),
        click.option("--expand-fusion", type=click.Choice(["interp", "rrf"]),
                     help="Interpolate the vectors (one search) or fuse the K+1 result "
                          "lists by reciprocal rank [default: interp]."),
        click.option("--expand-steps", type=click.IntRange(1, 1000), metavar="N",
                     help="Denoising steps (prior: 16, pixels: 25)."),
        click.option("--generator", metavar="SPEC",
                     help="diffusers text-to-image model id or save_pretrained folder "
                          "(--expand pixels; needs the `diffusion` extra)."),
    ]):
        f = decorator(f)
    return f


@main.command()
@click.argument("text", nargs=-1)
@click.option("--text", "-t", "texts", multiple=True, metavar="[W:]TEXT",
              help="Another text term (weighted with a W: prefix); repeatable.")
@click.option("--image", "-i", "images", multiple=True, metavar="[W:]PATH",
              help="An image term (image→image, or image→caption with --target captions).")
@click.option("--not", "negatives", multiple=True, metavar="[W:]TEXT",
              help="Steer away from TEXT (default weight 0.5); repeatable.")
@click.option("--target", type=click.Choice(["images", "captions"]), default="images",
              show_default=True, help="Which index to search.")
@search_options
@filter_options
@expansion_options
@json_option
@click.option("--paths", "paths_only", is_flag=True, help="Print only paths, one per line.")
@click.pass_context
def search(ctx: click.Context, text: tuple[str, ...], texts: tuple[str, ...],
           images: tuple[str, ...], negatives: tuple[str, ...], target: str, top: int,
           offset: int, threshold: float | None, under: str | None, dedup: bool, precision: str,
           after: str | None, before: str | None, year: str | None, month: str | None,
           camera: str | None, place: str | None, near: str | None, types: tuple[str, ...],
           tags: tuple[str, ...], sort: str, expand: str | None, expand_samples: int | None,
           expand_weight: float | None, expand_seed: int | None, expand_fusion: str | None,
           expand_steps: int | None, generator: str | None, as_json: bool,
           paths_only: bool) -> None:
    """Search the library with TEXT and/or --image, for images or --target captions.

    \b
    Terms combine in embedding space: q = normalise(Σ wᵢ·vᵢ) where each text or image vector
    vᵢ is a unit vector with weight wᵢ (1 unless a `W:` prefix says otherwise) and --not terms
    get negative weights (0.5 unless given). A weight is a number and a colon followed by a
    space or a non-digit: "2:sunset" is weighted, "10:00 alarm clock" and "16:9 photo" are
    plain texts, and "2: 3 people" weighs "3 people". Examples:
      clipdex search a dog on a beach
      clipdex search "a beach" --image ref.jpg --not people
      clipdex search "2:sunset" -t "0.5:mountains" --top 20
      clipdex search --image photo.jpg --target captions --json
      clipdex search "a red circle" --expand
      clipdex search "a beach" --year 2023 --camera iphone --sort date
      clipdex search --after 2024-06-01 --place Lisbon       (no query: newest first)
      clipdex search "a bridge" --near 38.69,-9.18,5 --type jpeg
    Filters (--after/--before/--year/--month, --camera, --place, --near, --type) combine with
    each other, with any query and with --under/--threshold/--dedup; captions are filtered by
    their linked image. They narrow the vector search itself, so a filtered search returns
    the best matches among the photos that pass, not the few of the overall best that do.
    An --image query never returns the query image itself. --expand moves a text query
    towards the image side of the space first (see `clipdex prior train`).

    Queries run on ONNX Runtime, without importing torch, from the export `clipdex index`
    makes of the library's model (the first query makes it when missing);
    CLIPDEX_RUNTIME=torch uses torch instead, CLIPDEX_RUNTIME=onnx refuses to.
    """
    if as_json and paths_only:
        raise click.UsageError("--json and --paths cannot be used together", ctx)
    _prefetch_tower(ctx, "text" if text or texts or negatives else "image" if images else None,
                    precision)

    from retrieval.expansion import Expansion
    from retrieval.filters import Filters

    filters = Filters.parse(after=after, before=before, year=year, month=month, camera=camera,
                            place=place, near=near, types=types, tags=tags)
    all_texts = ([" ".join(text)] if text else []) + list(texts)
    expansion = Expansion.from_options(expand, samples=expand_samples, weight=expand_weight,
                                       seed=expand_seed, fusion=expand_fusion,
                                       generator=generator, steps=expand_steps)
    searcher = _searcher(ctx, precision)
    try:
        result = searcher.search(all_texts, image=list(images), negatives=negatives,
                                 target=target, k=top, offset=offset, threshold=threshold,
                                 under=under, dedup=dedup, expand=expansion, filters=filters,
                                 sort=sort)
    finally:
        searcher.close()
    _print_hits(result, as_json=as_json, paths_only=paths_only)
    _skip_teardown()


def _prefetch_tower(ctx: click.Context, tower: str | None, precision: str | None) -> None:
    """Start opening the query tower's ONNX session before the store's imports (SQLAlchemy,
    FAISS: ~0.4 s of Python), so that the two overlap (index.onnx_runtime.prefetch). Only a
    head start: any problem is the query's own to meet and report."""
    if tower is None:
        return
    from index.errors import UsageProblem
    from index.settings import Settings

    try:
        obj = ctx.find_root().obj
        settings = Settings.resolve(obj["home"], obj["db"], precision=precision)
    except UsageProblem:
        return  # the command's own Settings.resolve says so
    if settings.runtime == "torch" or settings.precision == "bf16":
        return
    from index.onnx_runtime import discard_prefetched, prefetch

    if prefetch(settings.home, tower, settings.precision):
        # one the query did not take (it failed first, or used another file) is dropped when
        # the command ends, however it ends: a process that goes on must not keep it
        ctx.call_on_close(discard_prefetched)


def _skip_teardown() -> None:
    """A query command's process is about to end: have the interpreter's exit leave the objects
    it holds (SQLAlchemy's, FAISS's, ONNX Runtime's) to the OS instead of tearing them down one
    by one. A cold `clipdex search` spent 0.18-0.34 s exiting, 0.04-0.07 s with this (gc.freeze
    at exit: nothing is collected after it). Registered with atexit, so that a process that
    runs more after the command (CliRunner in tests) is unaffected until it ends itself."""
    global _TEARDOWN_SKIPPED
    if not _TEARDOWN_SKIPPED:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _TEARDOWN_SKIPPED = True


_TEARDOWN_SKIPPED = False


def _searcher(ctx: click.Context, precision: str | None):
    from retrieval import Searcher

    # one query per process: map the index file rather than load it (a 1M×512 index would take
    # ~3 s to load for one ~5 ms search)
    return Searcher(_library(ctx, create=False, precision=precision), mmap=True,
                    notify=lambda message: click.echo(f"warning: {message}", err=True))


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--top", "-k", "top", type=int, default=5, show_default=True)
@json_option
@click.pass_context
def caption(ctx: click.Context, image: str, top: int, as_json: bool) -> None:
    """The library's captions closest to IMAGE (which need not be indexed)."""
    _prefetch_tower(ctx, "image", None)
    searcher = _searcher(ctx, None)
    try:
        result = searcher.caption(image, k=top)
    finally:
        searcher.close()
    _print_hits(result, as_json=as_json, paths_only=False)
    _skip_teardown()


@main.command()
@json_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counts, model, index types and disk use of the library."""
    library = _library(ctx, create=False)
    try:
        data = library.stats()
    finally:
        library.close()
    if as_json:
        _emit_json(data)
        return
    click.echo(f"library:  {data['home']}")
    click.echo(f"model:    {data['model'] or '(none yet)'}" +
               (f" ({data['dim']}-d)" if data["dim"] else ""))
    click.echo(f"images:   {data['images']}")
    click.echo(f"captions: {data['captions']}")
    hint = "  (see clipdex failures)" if data["failed"] else ""
    click.echo(f"failed:   {data['failed']}{hint}")
    for name, info in data["index"].items():
        if info.get("type"):
            click.echo(f"index:    {name}: {info['type']}, {info['vectors']} vectors")
    click.echo(f"disk:     {data['bytes'] / 1e6:.1f} MB")
    photos = data["photos"]
    if photos["taken"]:
        sources = photos["taken"]["sources"]
        exif = sum(n for k, n in sources.items() if k != "mtime")
        click.echo(f"taken:    {photos['taken']['first'][:10]} to {photos['taken']['last'][:10]}"
                   f" ({exif} from EXIF, {sources.get('mtime', 0)} by file time)")
    if photos["cameras"]:
        click.echo(f"cameras:  {_top_counts(photos['cameras'])}")
    if photos["places"]:
        click.echo(f"places:   {_top_counts(photos['places'])}")
    if photos["with_metadata"]:
        click.echo(f"gps:      {photos['with_gps']} of {photos['with_metadata']} photos")
    if data.get("tags"):
        click.echo(f"tags:     {_top_counts(data['tags'], 10)}")
    if photos["needs_reindex"] > 0 and data["images"]:
        click.echo(f"metadata: {photos['needs_reindex']} photos have none yet: run "
                   f"`clipdex index` on their folders (nothing is re-embedded)")


def _top_counts(counts: dict, shown_at_most: int = 6) -> str:
    items = [f"{name} ({n})" for name, n in list(counts.items())[:shown_at_most]]
    more = len(counts) - shown_at_most
    return ", ".join(items) + (f", and {more} more" if more > 0 else "")


@main.command()
@click.option("--threshold", type=float, default=None, metavar="COS",
              help="Cosine above which two images are copies, in (0, 1] [default: 0.96, "
                   "measured with tiny on resized, recompressed and cropped copies].")
@click.option("--under", type=click.Path(file_okay=False),
              help="Only images below this folder.")
@json_option
@click.option("--paths", "paths_only", is_flag=True,
              help="Print only the other copies' paths (not the best of each group), one "
                   "per line.")
@click.option("--print0", is_flag=True,
              help="Like --paths, NUL-separated: `clipdex duplicates --print0 | xargs -0 "
                   "gio trash`.")
@click.pass_context
def duplicates(ctx: click.Context, threshold: float | None, under: str | None, as_json: bool,
               paths_only: bool, print0: bool) -> None:
    """Groups of near-duplicate images: exact copies, resized or recompressed versions, small
    crops. Each group lists its best copy first (the most pixels, then the earliest capture
    time, then the shortest path) and each other copy's cosine to it. Nothing is deleted:
    --paths/--print0 print the other copies for you to review or pipe to a trash tool.
    """
    if sum((as_json, paths_only, print0)) > 1:
        raise click.UsageError("--json, --paths and --print0 cannot be combined", ctx)
    from retrieval.duplicates import DUPLICATE_COSINE, find_duplicates

    searcher = _searcher(ctx, None)
    bar, update = _counting_bar(ctx, "img", "comparing")
    try:
        groups = find_duplicates(searcher, under=under,
                                 threshold=DUPLICATE_COSINE if threshold is None else threshold,
                                 progress=update)
    finally:
        bar.close()
        searcher.close()
    if as_json:
        _emit_json({"threshold": DUPLICATE_COSINE if threshold is None else threshold,
                    "groups": [g.as_dict() for g in groups]})
        return
    if paths_only or print0:
        sys.stdout.flush()
        end = b"\0" if print0 else b"\n"
        for group in groups:
            for copy in group.others:
                sys.stdout.buffer.write(os.fsencode(copy.path) + end)
        sys.stdout.buffer.flush()
        return
    if not groups:
        click.echo("no duplicates", err=True)
        return
    extra = sum(len(g.others) for g in groups)
    for number, group in enumerate(groups, 1):
        click.echo(f"group {number}: {len(group.copies)} copies")
        for copy in group.copies:
            mark = "best " if copy is group.best else f"{copy.cosine:.3f}"
            click.echo(f"  {mark}  {copy.width}×{copy.height}  {shown(copy.path)}")
    click.echo(f"{len(groups)} groups, {extra} copies besides the best of each", err=True)


@main.command()
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Labels to tag with: one per line, `# comments`, `[group]` lines start a "
                   "group [default: built in: shapes and colours for tiny, everyday "
                   "concepts for real models].")
@json_option
@click.pass_context
def tag(ctx: click.Context, labels: Path | None, as_json: bool) -> None:
    """Tag every image zero-shot with CLIP's text tower (replacing earlier tags).

    \b
    Each label's vector is the mean of its prompts' ("a photo of a {}.", …); within each group
    an image gets its best label, and any other scoring ≥ 0.3 (softmax at CLIP's scale).
    Once a library has tags, `clipdex index` tags new images the same way. Search with
    --tag LABEL; tags are in `search --json` (meta.tags), `stats` and the web page.
    """
    library = _library(ctx)
    bar, update = _counting_bar(ctx, "img", "tagging")
    try:
        report = library.tag(labels, progress=update)
    finally:
        bar.close()
        library.close()
    if as_json:
        _emit_json(report)
        return
    click.echo(f"tagged {report['images']} images with {report['labels']} labels "
               f"({report['source']})")
    if report["tags"]:
        click.echo(f"tags: {_top_counts(report['tags'], 12)}")


@main.command()
@json_option
@click.pass_context
def failures(ctx: click.Context, as_json: bool) -> None:
    """Files that could not be indexed, with the reason (retried when they change)."""
    library = _library(ctx, create=False)
    try:
        rows = library.failures()
    finally:
        library.close()
    if as_json:
        _emit_json({"failures": [{"path": f.path, "reason": f.reason} for f in rows]})
        return
    if not rows:
        click.echo("no failures")
    for f in rows:
        click.echo(f"{shown(f.path)}: {f.reason}")


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", "-n", type=click.IntRange(10), default=300, show_default=True)
@click.pass_context
def demo(ctx: click.Context, directory: Path | None, count: int) -> None:
    """Generate scenes, index them with the tiny model and query in every direction (offline).

    DIRECTORY defaults to ./clipdex-demo; the demo library lives in DIRECTORY/library unless
    --home is given.
    """
    from retrieval.demo import run_demo

    directory = directory or Path("clipdex-demo")
    home = ctx.find_root().obj["home"]
    command = _command_line()
    run_demo(directory, home=Path(home) if home else directory / "library",
             db=ctx.find_root().obj["db"], count=count, echo=click.echo,
             progress=_progress_enabled(ctx), command=command)
    activate = Path(sys.argv[0]).absolute().with_name("activate")  # a venv's bin/
    if command != "clipdex" and activate.is_file():
        click.echo(f"  (clipdex is not on your PATH: `source {shown(str(activate))}` puts it "
                   f"there, then plain `clipdex` works)")


def _command_line() -> str:
    """How to run this clipdex from the user's shell, as they can type it: `clipdex` when PATH
    finds this very one, else its path (e.g. .venv/bin/clipdex in a venv never activated)."""
    import shlex
    import shutil

    running = Path(sys.argv[0])
    on_path = shutil.which("clipdex")
    if running.name == "clipdex" and running.is_file():
        if on_path and os.path.samefile(on_path, running):
            return "clipdex"
        return shlex.quote(str(running.absolute()))
    if on_path:
        return "clipdex"
    return f"{shlex.quote(sys.executable)} -m cli"


def _batch_line(batch) -> str:
    r = batch.report
    parts = [f"{n} {name}" for n, name in ((r.new, "new"), (r.changed, "changed"),
                                            (r.moved, "moved"), (r.removed, "removed"),
                                            (r.failed, "failed")) if n]
    what = ", ".join(parts) or "nothing changed"
    waiting = f" ({batch.waiting} still being written)" if batch.waiting else ""
    head = "caught up" if batch.startup else "indexed"
    return f"{head}: {what} in {r.total_seconds:.1f}s{waiting}"


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", metavar="SPEC", envvar="CLIPDEX_MODEL",
              help="The model for a new library (an existing one keeps its own).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip matching files/folders.")
@click.option("--hidden", "include_hidden", is_flag=True, help="Also index hidden files.")
@click.option("--poll", is_flag=True,
              help="List the folders every 0.5 s instead of waiting for events (network "
                   "mounts and others that send none).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per batch, a line each (the start-up one first).")
@click.pass_context
def watch(ctx: click.Context, paths: tuple[Path, ...], model: str | None,
          exclude: tuple[str, ...], include_hidden: bool, poll: bool, as_json: bool) -> None:
    """Index PATHS, then keep indexing what changes under them until Ctrl-C.

    \b
    New, changed, moved and deleted photos go through the same steps as `clipdex index`; a
    burst of changes is indexed in a few batches, and a file still being written waits until
    its size and mtime hold still. Start-up catches up with what changed while nothing
    watched. Each batch is reported on stderr (--json: one JSON object per line on stdout).
    Caption files are not watched: add them with `clipdex captions add`.
    """
    from index.watch import check_folders
    from index.watch import watch as run_watch

    check_folders(paths)
    library = _library(ctx)

    def on_batch(batch) -> None:
        if as_json:
            click.echo(json.dumps({"startup": batch.startup, "paths": len(batch.paths),
                                   "waiting": batch.waiting, **batch.report.as_dict()}))
            sys.stdout.flush()
        else:
            click.echo(_batch_line(batch), err=True)
            for path, reason in batch.report.failures[:20]:
                click.echo(f"  failed: {shown(path)}: {reason}", err=True)

    if not as_json:
        click.echo(f"watching {', '.join(shown(str(p)) for p in paths)} (Ctrl-C stops)",
                   err=True)
    try:
        run_watch(library, paths, model=model, poll=poll, on_batch=on_batch,
                  exclude=exclude, include_hidden=include_hidden)
    except KeyboardInterrupt:
        click.echo("\nstopped: every batch indexed so far is saved", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    finally:
        library.close()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than loopback exposes the library).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--cors", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. a clip-front) call the API; repeatable.")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests for Host NAME (beside 127.0.0.1, localhost, ::1 and "
                   "--host), e.g. the machine's name on the LAN; repeatable.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]),
              default="auto", help="Query encoder precision.")
@click.option("--watch", "watch_paths", multiple=True, type=click.Path(path_type=Path),
              metavar="PATH",
              help="Also index PATH now and whatever changes under it while serving "
                   "(as `clipdex watch`); repeatable.")
@click.option("--model", "-m", metavar="SPEC", envvar="CLIPDEX_MODEL",
              help="With --watch: the model for a new library.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, cors_origins: tuple[str, ...],
          allowed_hosts: tuple[str, ...], precision: str, watch_paths: tuple[Path, ...],
          model: str | None) -> None:
    """Serve the web page, the JSON API (/docs) and clip-retrieval's API over HTTP.

    Keeps answering while `clipdex index` adds to the library, and sees what it added.
    Requests for other Host names are refused (DNS rebinding), and so are requests from web
    pages of other origins than its own and --cors.
    """
    from importlib.util import find_spec

    if not all(find_spec(m) for m in ("fastapi", "fastapi_offline", "uvicorn")) or not (
            find_spec("python_multipart") or find_spec("multipart")):
        raise click.ClickException(f"the server needs the `server` extra (FastAPI, uvicorn): "
                                   f"{_server_install_line()}")
    _check_port_free(host, port)
    from retrieval.server import serve as run_server

    obj = ctx.find_root().obj
    watcher = _start_watcher(ctx, watch_paths, model) if watch_paths else None
    try:
        run_server(home=obj["home"], db=obj["db"], host=host, port=port, precision=precision,
                   cors_origins=cors_origins, allowed_hosts=allowed_hosts, echo=click.echo)
    finally:
        if watcher is not None:
            watcher.set()


def _start_watcher(ctx: click.Context, paths: tuple[Path, ...], model: str | None):
    """Watch in a thread with a library of its own, and wait for its start-up catch-up (so
    the server opens a library that exists); returns the event that stops it.

    The catch-up runs in the watcher, after its watch has begun: a photo that lands while
    the server starts is not missed."""
    import threading

    from index.watch import check_folders
    from index.watch import watch as run_watch

    folders = check_folders(paths)
    library = _library(ctx)
    stop, ready = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def on_batch(batch) -> None:
        if batch.startup:
            report = batch.report
            click.echo(f"watch: {report.new} new, {report.removed} removed, "
                       f"{report.unchanged} unchanged in {report.total_seconds:.1f}s; "
                       f"watching {', '.join(folders)}", err=True)
            ready.set()
        else:
            click.echo(f"watch: {_batch_line(batch)}", err=True)

    def run() -> None:
        try:
            run_watch(library, folders, model=model, stop=stop, on_batch=on_batch)
        except Exception as exc:
            if not ready.is_set():  # the start-up failed: the command reports it
                failure.append(exc)
            else:  # the server goes on; the watcher says why it stopped
                click.echo(f"watch: stopped: {type(exc).__name__}: {exc}", err=True)
        finally:
            library.close()
            ready.set()

    thread = threading.Thread(target=run, name="clipdex-watch", daemon=True)
    thread.start()
    try:
        ready.wait()
    except BaseException:  # Ctrl-C during the catch-up
        stop.set()
        raise
    if failure:
        raise failure[0]
    return stop


def _server_install_line() -> str:
    """The install command that works for this installation: from its clone when it is one."""
    import shlex

    clone = Path(__file__).resolve().parent
    pip = f"{shlex.quote(sys.executable)} -m pip install"
    if (clone / "pyproject.toml").is_file():  # an editable install, or run from a clone
        return f"{pip} -e {shlex.quote(f'{clone}[server]')}"
    return f"{pip} 'clipdex[server]'"


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on before loading anything (uvicorn would say
    so only after the model loaded, and exit 3, which means "some files failed" here)."""
    import errno
    import socket

    if port == 0:  # any free port
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as uvicorn does, so a port left in TIME_WAIT by a server just stopped counts as free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise click.ClickException(f"port {port} is already in use on {host}: choose "
                                           f"another with --port") from None
            raise click.ClickException(f"cannot listen on {host} port {port}: "
                                       f"{exc.strerror or exc}") from None


@main.group()
def prior() -> None:
    """Query-expansion models learnt from the library's caption–image pairs (--expand)."""


@prior.command("train")
@click.option("--steps", type=click.IntRange(1),
              help="The prior's optimiser steps [default: from --epochs].")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=40.0,
              show_default=True,
              help="The prior's passes over the pairs (clamped to 150-6000 steps).")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@click.pass_context
def prior_train(ctx: click.Context, steps: int | None, epochs: float, seed: int,
                as_json: bool) -> None:
    """Train the contrastive map and the diffusion prior (and fit the mean-shift and ridge
    maps) for --expand.

    Learns from every caption linked to an indexed image, and saves prior.safetensors and
    prior.json in the library folder; tied to the library's model. --steps and --epochs set
    the prior's training; the contrastive map takes one step per pair, 300-1000.

    What it costs on 2 cores (measured): 300 pairs train in ~4 s with tiny and ~14 s with a
    512-d model (ViT-B-32); at the prior's 6000-step cap (from ~38k pairs) about 5 and 12
    minutes.
    """
    from retrieval.expansion import train_expanders
    from retrieval.expansion.prior import TrainConfig

    library = _library(ctx, create=False)
    bars: list = []  # drawn at the first step: a library without pairs fails before any

    def progress(done: int, total: int, loss: float) -> None:
        if not bars:
            bars.append(_counting_bar(ctx, "step", desc="training prior + map"))
        bars[0][1](done, total, loss=f"{loss:.4f}")

    try:
        report = train_expanders(library, train=TrainConfig(steps=steps, epochs=epochs,
                                                            seed=seed), progress=progress)
    finally:
        for bar, _ in bars:
            bar.close()
        library.close()
    from retrieval.expansion.contrastive import MIN_USEFUL_PAIRS

    if report.pairs < MIN_USEFUL_PAIRS:
        click.echo(f"note: with fewer than {MIN_USEFUL_PAIRS} caption–image pairs the "
                   f"contrastive map (the --expand default) did not beat plain search in "
                   f"bench/expansion.py; compare with and without --expand on your queries",
                   err=True)
    if as_json:
        _emit_json(report.as_dict())
        return
    click.echo(f"trained on {report.pairs} caption–image pairs ({report.images} images): "
               f"prior {report.steps} steps in {report.seconds:.1f}s, loss "
               f"{report.final_loss:.4f}; contrastive map {report.contrastive_steps} steps in "
               f"{report.contrastive_seconds:.1f}s, loss {report.contrastive_loss:.4f}; "
               f"saved {report.path}")


if __name__ == "__main__":  # pragma: no cover
    main()
