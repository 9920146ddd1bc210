"""The metadata store: the source of truth for rows *and* their vectors (SQLAlchemy 2.0).

Every committed image or caption row carries its vector; FAISS files are derived from this
store. Each change to a kind's vectors bumps that kind's generation in the same transaction, so a
vector index knows whether it is current.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
from sqlalchemy import (
    ForeignKey,
    Index,
    LargeBinary,
    String,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import ClipdexError, ModelMismatch

__all__ = [
    "SCHEMA_VERSION",
    "Base",
    "CaptionRow",
    "FailureRow",
    "ImageRow",
    "Store",
    "vector_from_blob",
]

SCHEMA_VERSION = 1
KINDS = ("image", "caption")


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(4096))


class ImageRow(Base):
    __tablename__ = "images"
    # Never hand a deleted id out again: derived FAISS indexes are caught up by diffing id
    # sets, so a reused id would keep the old image's vector (SQLite reuses the highest rowid
    # without AUTOINCREMENT; PostgreSQL sequences never reuse).
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    size: Mapped[int]
    mtime_ns: Mapped[int]
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int]
    height: Mapped[int]
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    added_at: Mapped[float]


class CaptionRow(Base):
    __tablename__ = "captions"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(8192))
    # sha256 of (text, image reference): adding the same file twice adds nothing
    key: Mapped[str] = mapped_column(String(64), unique=True)
    image_ref: Mapped[str | None] = mapped_column(String(4096), index=True)
    image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL"), index=True)
    source: Mapped[str] = mapped_column(String(4096))
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class FailureRow(Base):
    __tablename__ = "failures"
    path: Mapped[str] = mapped_column(String(4096), primary_key=True)
    size: Mapped[int]
    mtime_ns: Mapped[int]
    reason: Mapped[str] = mapped_column(String(1024))
    failed_at: Mapped[float]


Index("ix_images_path_prefix", ImageRow.path)


def vector_from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a power cut may lose the last commits but never corrupts the database
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Store:
    """One library's database: rows, vectors, failures, model fingerprint and generations."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._check_schema()

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self.sessions()

    # --- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str, session: Session | None = None) -> str | None:
        if session is not None:
            row = session.get(MetaRow, key)
            return row.value if row else None
        with self.session() as s:
            row = s.get(MetaRow, key)
            return row.value if row else None

    def set_meta(self, session: Session, key: str, value: str) -> None:
        session.merge(MetaRow(key=key, value=value))

    def _check_schema(self) -> None:
        with self.session() as s, s.begin():
            version = self.get_meta("schema_version", s)
            if version is None:
                self.set_meta(s, "schema_version", str(SCHEMA_VERSION))
            elif int(version) > SCHEMA_VERSION:
                raise ClipdexError(
                    f"this library was written by a newer clipdex (schema {version}); upgrade")

    def model_fingerprint(self) -> tuple[str, int] | None:
        with self.session() as s:
            model, dim = self.get_meta("model", s), self.get_meta("dim", s)
        return (model, int(dim)) if model and dim else None

    def claim_model(self, model: str, dim: int, preprocess: str) -> None:
        """Record the library's model at first use; refuse any other model later."""
        with self.session() as s, s.begin():
            recorded = self.get_meta("model", s)
            if recorded is None:
                self.set_meta(s, "model", model)
                self.set_meta(s, "dim", str(dim))
                self.set_meta(s, "preprocess", preprocess)
                return
        check_model(recorded, model)

    # --- generations ------------------------------------------------------------------------
    def generation(self, kind: str) -> int:
        value = self.get_meta(f"generation.{kind}")
        return int(value) if value else 0

    def bump_generation(self, session: Session, kind: str) -> None:
        current = self.get_meta(f"generation.{kind}", session)
        self.set_meta(session, f"generation.{kind}", str(int(current or 0) + 1))

    # --- vectors ----------------------------------------------------------------------------
    def ids(self, kind: str) -> np.ndarray:
        table = ImageRow if kind == "image" else CaptionRow
        with self.session() as s:
            return np.fromiter(s.scalars(select(table.id)), dtype=np.int64)

    def iter_vectors(self, kind: str, ids: Iterable[int] | None = None,
                     chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) chunks, for all rows or the given ids."""
        table = ImageRow if kind == "image" else CaptionRow
        with self.session() as s:
            if ids is None:
                rows = s.execute(select(table.id, table.vector).order_by(table.id)
                                 .execution_options(yield_per=chunk))
                for part in rows.partitions(chunk):
                    yield _stack(part)
                return
            wanted = [int(i) for i in ids]
            for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
                part = s.execute(select(table.id, table.vector)
                                 .where(table.id.in_(wanted[start:start + 900]))).all()
                if part:
                    yield _stack(part)

    def vectors_for(self, kind: str, ids: Iterable[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for chunk_ids, vectors in self.iter_vectors(kind, ids):
            out.update(zip(chunk_ids.tolist(), vectors))
        return out

    def count(self, kind: str) -> int:
        table = ImageRow if kind == "image" else CaptionRow
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(table)) or 0)

    def link_captions(self, session: Session) -> int:
        """Link captions whose image reference now matches an indexed image's path."""
        matched = select(ImageRow.id).where(ImageRow.path == CaptionRow.image_ref).scalar_subquery()
        result = session.execute(
            update(CaptionRow).where(CaptionRow.image_id.is_(None),
                                     CaptionRow.image_ref.in_(select(ImageRow.path)))
            .values(image_id=matched).execution_options(synchronize_session=False))
        return int(result.rowcount or 0)


def _stack(rows) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vectors = np.stack([vector_from_blob(r[1]) for r in rows])
    return ids, vectors


def check_model(recorded: str, requested: str) -> None:
    if recorded != requested:
        raise ModelMismatch(
            f"this library was built with model {recorded!r}; it cannot mix in vectors from "
            f"{requested!r}. Use --model {recorded} with this library, or start a new "
            f"library for the other model with --home DIR.")


def now() -> float:
    return time.time()
