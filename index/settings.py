"""Where a library lives: one Settings object, flag > environment (CLIPDEX_*) > default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "Settings", "default_home"]

# What a user with a network gets by default. These machines cannot download it: `--model tiny`.
DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"


def default_home() -> Path:
    """The per-user data directory (e.g. ~/.local/share/clipdex)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("clipdex", appauthor=False))


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str | None = None  # any SQLAlchemy URL; default SQLite inside `home`

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None,
                db_url: str | None = None) -> "Settings":
        home = home or os.environ.get("CLIPDEX_HOME") or default_home()
        db_url = db_url or os.environ.get("CLIPDEX_DB") or None
        return cls(Path(home).expanduser().resolve(), db_url)

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'library.db'}"

    @property
    def index_dir(self) -> Path:
        return self.home / "vectors"
