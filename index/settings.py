"""Every knob in one Settings object, resolved once: flag > environment (CLIPDEX_*) > default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageProblem

__all__ = ["DECODE_NICE", "DEFAULT_MODEL", "ENVIRONMENT", "PRECISIONS", "RUNTIMES", "Settings",
           "default_home"]

# What a user with a network gets by default. These machines cannot download it: `--model tiny`.
DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
PRECISIONS = ("auto", "fp32", "bf16", "int8")
# Decode threads run this much nicer than the model's threads (Linux, per thread). Decoding and
# the model share the cores; at equal priority the decoders preempt torch's OpenMP workers,
# which then stall each other at every barrier (bench/decode_priority.py). 0: off.
DECODE_NICE = 10
# field -> the environment variable that sets it when no flag does
ENVIRONMENT = {
    "home": "CLIPDEX_HOME", "db_url": "CLIPDEX_DB", "model": "CLIPDEX_MODEL",
    "precision": "CLIPDEX_PRECISION", "workers": "CLIPDEX_WORKERS",
    "decode_gate": "CLIPDEX_DECODE_GATE", "decode_nice": "CLIPDEX_DECODE_NICE",
    "runtime": "CLIPDEX_RUNTIME",
}
# How queries encode: "auto" on ONNX Runtime where the model's export passed its probe (else
# torch, with a notice), "onnx" never torch (an error instead), "torch" always torch.
RUNTIMES = ("auto", "onnx", "torch")


def default_home() -> Path:
    """The per-user data directory (e.g. ~/.local/share/clipdex)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("clipdex", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """Where a library lives and how it is written and read.

    Attributes:
        home: the library folder.
        db_url: any SQLAlchemy URL for the store; None: SQLite inside `home`.
        model: the model spec asked for; None: the library's own (DEFAULT_MODEL when new).
        precision: one of PRECISIONS.
        workers: decode threads; None: one per core.
        decode_gate: on a CPU, decoders and the model take turns (index.ingest._Turns).
        decode_nice: how much nicer decode threads run than the model's.
        runtime: how queries (and, where the export's image tower runs on it, ingestion)
            encode, one of RUNTIMES.
    """

    home: Path
    db_url: str | None = None
    model: str | None = None
    precision: str = "auto"
    workers: int | None = None
    decode_gate: bool = True
    decode_nice: int = DECODE_NICE
    runtime: str = "auto"

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None, db_url: str | None = None, *,
                model: str | None = None, precision: str | None = None,
                workers: int | None = None, environ: Mapping[str, str] | None = None,
                ) -> "Settings":
        """Each value from its flag (the arguments), else its CLIPDEX_* variable, else the
        default. A malformed variable is a UsageProblem naming it."""
        env = os.environ if environ is None else environ

        def pick(field: str, flag):
            if flag is not None:
                return flag
            value = env.get(ENVIRONMENT[field], "").strip()
            return value or None

        home = pick("home", home) or default_home()
        chosen_precision = pick("precision", precision) or "auto"
        if chosen_precision not in PRECISIONS:
            raise UsageProblem(f"precision must be one of {', '.join(PRECISIONS)}, not "
                               f"{chosen_precision!r}" + _from_env("precision", precision))
        runtime = env.get(ENVIRONMENT["runtime"], "").strip().lower() or "auto"
        if runtime not in RUNTIMES:
            raise UsageProblem(f"{ENVIRONMENT['runtime']} must be one of {', '.join(RUNTIMES)}, "
                               f"not {runtime!r}")
        return cls(
            home=Path(home).expanduser().resolve(),
            db_url=pick("db_url", db_url),
            model=pick("model", model),
            precision=chosen_precision,
            workers=_int(pick("workers", workers), "workers", minimum=1),
            decode_gate=_flag(env.get(ENVIRONMENT["decode_gate"]), "decode_gate", True),
            decode_nice=_default(_int(env.get(ENVIRONMENT["decode_nice"], "").strip() or None,
                                      "decode_nice", minimum=0), DECODE_NICE),
            runtime=runtime,
        )

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'library.db'}"

    @property
    def index_dir(self) -> Path:
        return self.home / "vectors"


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def _from_env(field: str, flag: object) -> str:
    return "" if flag is not None else f" (from {ENVIRONMENT[field]})"


def _int(value: object, field: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum:
        raise UsageProblem(f"{ENVIRONMENT[field]} must be an integer >= {minimum}, not "
                           f"{value!r}")
    return number


def _flag(value: str | None, field: str, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise UsageProblem(f"{ENVIRONMENT[field]} must be 0 or 1, not {value!r}")
