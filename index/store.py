"""The metadata store: the source of truth for rows *and* their vectors (SQLAlchemy 2.0).

Every committed image or caption row carries its vector; FAISS files are derived from this
store. Each change to a kind's vectors bumps that kind's generation in the same transaction, so a
vector index knows whether it is current.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from .errors import LibraryUnavailable, ModelMismatch, NoLibrary

__all__ = [
    "SCHEMA_VERSION",
    "CaptionInfo",
    "CaptionPairs",
    "ImageFile",
    "MetaColumns",
    "Store",
    "StoredFailure",
    "vector_blob",
    "vector_from_blob",
]

# 1: images, captions, failures. 2: image_meta (photo metadata; made on a writer's open, its
# rows filled by the next `clipdex index` without re-embedding anything). 3: image_tags
# (zero-shot tags, written by `clipdex tag` and then at index time). 4: vectors move out of
# the images and captions rows into image_vectors / caption_vectors (id -> float16), migrated
# in place by a writer's open (see _migrate_vectors).
SCHEMA_VERSION = 4
KINDS = ("image", "caption")


# A file name that is not valid UTF-8 reaches Python as a str holding lone surrogates
# (PEP 383), which no database can store. Such a path is stored as this marker plus its bytes
# percent-encoded: lossless, and no real (absolute) path starts with the marker.
_UNDECODABLE = "fsbytes:"
REASON_CHARS = 1024


class FilePath(TypeDecorator):
    """A file path, stored losslessly whatever bytes its name holds."""

    impl = String(4096)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        if value is None:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return _UNDECODABLE + urllib.parse.quote_from_bytes(os.fsencode(value), safe="/")
        return value

    def process_result_value(self, value: str | None, dialect) -> str | None:
        if value is not None and value.startswith(_UNDECODABLE):
            return os.fsdecode(urllib.parse.unquote_to_bytes(value[len(_UNDECODABLE):]))
        return value


@dataclass(frozen=True)
class ImageFile:
    """An indexed image's file as the store knows it (what serving it checks against)."""

    id: int
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class CaptionInfo:
    """A caption and the image it is linked to (image_id and path None when unlinked)."""

    id: int
    text: str
    image_id: int | None
    path: str | None


@dataclass(frozen=True)
class CaptionPairs:
    """Every caption linked to an indexed image, with both vectors (row i is one pair)."""

    caption_ids: np.ndarray
    image_ids: np.ndarray
    text_vectors: np.ndarray
    image_vectors: np.ndarray


@dataclass(frozen=True)
class StoredFailure:
    path: str
    reason: str
    failed_at: float


ROOTS_PER_QUERY = 100  # SQLite parses `a OR b OR ...` into a tree at most 1000 deep


def rows_under(session, query, column, roots: list[str], *, scalars: bool = False) -> list:
    """The rows of `query` whose `column` (a FilePath) may lie at or under `roots` (a
    superset: callers still check each path exactly), found through the path index on SQLite
    rather than by reading every row of a large library for a watch batch's few files."""
    run = session.scalars if scalars else session.execute
    if not _all_utf8(roots):  # an undecodable root: its rows are stored encoded
        return list(run(query))
    rows: dict[object, object] = {}
    for start in range(0, len(roots), ROOTS_PER_QUERY):
        for row in run(query.where(
                under_condition(session, column, roots[start:start + ROOTS_PER_QUERY]))):
            rows[row.path] = row
    return list(rows.values())


def under_condition(session, column, roots: list[str]):
    """SQL for "`column` is one of `roots`, below one, or a stored undecodable path".

    SQLite compares text bytewise, so "below ROOT" is the range [ROOT/, ROOT0) ('0' follows
    '/') on the path index. Other databases compare by collation, where that range is not
    exact; they use substr(path, 1, len) = 'ROOT/' (exact, a scan in the database).
    """
    sqlite = session.get_bind().dialect.name == "sqlite"

    def below(prefix: str):
        if sqlite:
            return (column >= prefix) & (column < prefix[:-1] + chr(ord(prefix[-1]) + 1))
        return func.substr(column, 1, len(prefix)) == prefix

    return or_(column.in_(roots), below(_UNDECODABLE),
               *(below(r.rstrip(os.sep) + os.sep) for r in roots))


def _all_utf8(names: Iterable[str]) -> bool:
    try:
        for name in names:
            name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    path: Mapped[str] = mapped_column(FilePath, unique=True)
    # 64-bit: a file's size and its mtime in nanoseconds (~1.7e18) overflow PostgreSQL's integer
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int]
    height: Mapped[int]
    added_at: Mapped[float]


class CaptionRow(Base):
    __tablename__ = "captions"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(8192))
    # sha256 of (text, image reference): adding the same file twice adds nothing
    key: Mapped[str] = mapped_column(String(64), unique=True)
    image_ref: Mapped[str | None] = mapped_column(FilePath, index=True)
    image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL"), index=True)
    source: Mapped[str] = mapped_column(FilePath)


# Vectors live in tables of their own, id -> float16 (schema 4). In the image row, a 2 KB
# float32 vector beside path and hash filled most of a 4 KB page (one row per page, 4.3 KB per
# ViT-B-32 image); here a 1 KB row packs 15 to a 16 KB page (bench/scale.py measures the bytes
# per image). float16 keeps cosine >= 0.99999 to the model's float32 output (measured in
# bench/scale.py and tested); FAISS indexes are built from these stored vectors, so "exact"
# means exact over what the store holds.
class ImageVectorRow(Base):
    __tablename__ = "image_vectors"
    id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"),
                                    primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class CaptionVectorRow(Base):
    __tablename__ = "caption_vectors"
    id: Mapped[int] = mapped_column(ForeignKey("captions.id", ondelete="CASCADE"),
                                    primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


VECTOR_TABLES = {"image": ImageVectorRow, "caption": CaptionVectorRow}
VECTOR_DTYPE = np.dtype("<f2")


class ImageMetaRow(Base):
    """An image's photo metadata (index.photo_meta): one row per image, gone with it."""

    __tablename__ = "image_meta"
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int]
    taken_at: Mapped[float | None] = mapped_column(Float, index=True)
    taken_offset: Mapped[int | None]
    taken_source: Mapped[str | None] = mapped_column(String(32))
    make: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(128))
    camera: Mapped[str | None] = mapped_column(String(260))
    lens: Mapped[str | None] = mapped_column(String(128))
    lat: Mapped[float | None] = mapped_column(Float)
    lon: Mapped[float | None] = mapped_column(Float)
    alt: Mapped[float | None] = mapped_column(Float)
    format: Mapped[str | None] = mapped_column(String(16))
    country_code: Mapped[str | None] = mapped_column(String(8))
    country: Mapped[str | None] = mapped_column(String(128))
    region: Mapped[str | None] = mapped_column(String(128))
    city: Mapped[str | None] = mapped_column(String(200))


class ImageTagRow(Base):
    """A zero-shot tag of an image (index.tags): its label within a group, and its score."""

    __tablename__ = "image_tags"
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    grp: Mapped[str] = mapped_column(String(100), primary_key=True)
    label: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)
    score: Mapped[float] = mapped_column(Float)


META_FIELDS = ("taken_at", "taken_offset", "taken_source", "make", "model", "camera", "lens",
               "lat", "lon", "alt", "format", "country_code", "country", "region", "city")


@dataclass(frozen=True)
class MetaColumns:
    """Every image's filterable metadata, column by column (row i is image ids[i]); what the
    query side's filters are evaluated on. Missing values are None."""

    ids: list[int]
    taken_at: list[float | None]
    camera: list[str | None]
    country_code: list[str | None]
    country: list[str | None]
    region: list[str | None]
    city: list[str | None]
    lat: list[float | None]
    lon: list[float | None]
    format: list[str | None]


class FailureRow(Base):
    __tablename__ = "failures"
    path: Mapped[str] = mapped_column(FilePath, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(REASON_CHARS))
    failed_at: Mapped[float]


# The path's UNIQUE constraint is its index (a range on it finds the rows under a folder). The
# foundation also made `ix_images_path_prefix` on the same column: 51 MB of a 1M-image
# library with 36-character paths (sqlite3 dbstat), more with real ones, for nothing; a
# writer's open drops it.
REDUNDANT_INDEXES = ("ix_images_path_prefix",)


def vector_blob(vector: np.ndarray) -> bytes:
    """How the store keeps a vector: little-endian float16."""
    return np.asarray(vector, np.float32).astype(VECTOR_DTYPE).tobytes()


def vector_from_blob(blob: bytes) -> np.ndarray:
    """A stored vector as a float32 unit vector (what FAISS and the query side use)."""
    return _vectors_from_blobs([blob])[0]


def _vectors_from_blobs(blobs: list[bytes], dtype: np.dtype = VECTOR_DTYPE,
                        unit: bool = True) -> np.ndarray:
    """Many stored vectors (all the same length) as one float32 array, decoded at once.

    float16 rounding moves a unit vector's norm by up to ~1e-5 (more at low dimensions); each
    is scaled back to unit length (`unit_rows`), so inner products stay cosines (an image
    scores 1.0 against itself). With `unit=False` the float16 values come as they are: what
    a float16 index keeps, so that it gives back exactly these vectors."""
    joined = np.frombuffer(b"".join(blobs), dtype=dtype)
    vectors = joined.reshape(len(blobs), -1).astype(np.float32)
    return unit_rows(vectors) if unit and dtype == VECTOR_DTYPE else vectors


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Scale float32 rows to unit length in place (zero rows stay zero); returns them."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.where(norms > 0, norms, 1.0)
    return vectors


# A new SQLite library's page size (an existing one keeps its own, unless a migration
# compacts it): 1 KB float16 vector rows pack 15 to a page at 16 KB, 3 at 4 KB. 100k 512-d rows
# cost 1,369 / 1,172 / 1,093 / 1,058 B each at 4 / 8 / 16 / 32 KB pages, and 200 random rows
# read in 1.0 / 1.2 / 1.1 / 1.3 ms (warm; measured 2026-12-02).
SQLITE_PAGE_SIZE = 16384


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only an empty database heeds it
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a power cut may lose the last commits but never corrupts the database
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Store:
    """One library's database: rows, vectors, failures, model fingerprint and generations."""

    def __init__(self, url: str, *, create: bool = True,
                 notice: Callable[[str], None] | None = None) -> None:
        """Open the store at `url`; with `create` (writers) make its tables when missing and
        migrate an older library in place (`notice` hears about long steps).

        Readers (`create=False`) write nothing: a missing library is NoLibrary. A URL that
        cannot be used (malformed, driver missing, server unreachable) is LibraryUnavailable.
        """
        self.url = url
        self._apart: set[str] = set()  # kinds whose vectors are known to be in their tables
        self.engine: Engine = _engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        event.listen(self.engine, "handle_error", _unavailable_database(url))
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        with _database_errors(url):
            if create:
                with _schema_lock(self.engine):
                    self._make_schema(notice)
            elif not inspect(self.engine).has_table(MetaRow.__tablename__):
                self.engine.dispose()
                raise NoLibrary(f"no library in {_redacted(url)}")
            else:
                self._check_schema(create)

    def _make_schema(self, notice: Callable[[str], None] | None) -> None:
        """Make the missing tables and bring an older library to SCHEMA_VERSION."""
        Base.metadata.create_all(self.engine)
        if self.engine.dialect.name == "postgresql":
            _widen_postgres_columns(self.engine)
        with self.engine.begin() as conn:
            for name in REDUNDANT_INDEXES:
                conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
        _migrate_vectors(self.engine, notice)
        self._check_schema(True)

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self.sessions()

    # --- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str, session: Session | None = None) -> str | None:
        query = select(MetaRow.value).where(MetaRow.key == key)
        if session is not None:  # read from the database: set_meta bypasses the ORM's cache
            return session.scalar(query)
        with self.session() as s:
            return s.scalar(query)

    def set_meta(self, session: Session, key: str, value: str) -> None:
        """One upsert: two writers setting a new key at once both succeed (the later wins),
        where a read then an insert would fail the second with a duplicate key."""
        upsert = _insert_for(session)(MetaRow).values(key=key, value=value)
        session.execute(upsert.on_conflict_do_update(index_elements=[MetaRow.key],
                                                     set_={"value": value}))

    def _check_schema(self, create: bool) -> None:
        with self.session() as s, s.begin():
            version = self.get_meta("schema_version", s)
            if version is not None and int(version) > SCHEMA_VERSION:
                raise LibraryUnavailable(
                    f"this library was written by a newer clipdex (schema {version}; this one "
                    f"reads up to {SCHEMA_VERSION}): upgrade clipdex")
            if create and (version is None or int(version) < SCHEMA_VERSION):
                # create_all made the tables a newer schema adds; their rows come later
                self.set_meta(s, "schema_version", str(SCHEMA_VERSION))
                version = str(SCHEMA_VERSION)
        self.schema_version = int(version) if version is not None else (SCHEMA_VERSION if create
                                                                          else 1)

    def model_fingerprint(self) -> tuple[str, int] | None:
        with self.session() as s:
            model, dim = self.get_meta("model", s), self.get_meta("dim", s)
        return (model, int(dim)) if model and dim else None

    def claim_model(self, model: str, dim: int, preprocess: str) -> None:
        """Record the library's model at first use; refuse any other model later."""
        with self.session() as s, s.begin():
            if self.get_meta("model", s) is None:
                # another writer may be claiming it too: the first to commit keeps its model
                for key, value in (("model", model), ("dim", str(dim)),
                                   ("preprocess", preprocess)):
                    s.execute(_insert_for(s)(MetaRow).values(key=key, value=value)
                              .on_conflict_do_nothing(index_elements=[MetaRow.key]))
            recorded = self.get_meta("model", s)
        check_model(recorded, model)

    # --- generations ------------------------------------------------------------------------
    def generation(self, kind: str) -> int:
        value = self.get_meta(f"generation.{kind}")
        return int(value) if value else 0

    def bump_generation(self, session: Session, kind: str) -> None:
        """Add one to the kind's generation, in the session's transaction.

        One statement that increments in the database: a read then a write lets two writers
        on PostgreSQL (READ COMMITTED) both read N and both write N+1, and an index saved at
        N+1 then misses one of their batches. The row stays locked until the transaction
        ends, so generations follow commit order.
        """
        upsert = _insert_for(session)(MetaRow).values(key=f"generation.{kind}", value="1")
        session.execute(upsert.on_conflict_do_update(
            index_elements=[MetaRow.key],
            set_={"value": cast(cast(MetaRow.value, Integer) + 1, String)}))

    # --- vectors ----------------------------------------------------------------------------
    def ids(self, kind: str) -> np.ndarray:
        """Every id of the kind, through the driver's cursor (every watch batch's index
        catch-up asks for all of them), IDS_CHUNK rows at a time: the driver's tuples cost
        ~90 B per id (0.9 GB at 10M) where the array holds 8."""
        table = ImageRow if kind == "image" else CaptionRow
        sql = str(select(table.id).compile(dialect=self.engine.dialect))
        parts = []
        with self.engine.connect() as conn:
            cursor = conn.connection.driver_connection.cursor()
            try:
                cursor.execute(sql)
                while rows := cursor.fetchmany(IDS_CHUNK):
                    parts.append(np.fromiter((r[0] for r in rows), np.int64, count=len(rows)))
            finally:
                cursor.close()
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def _driver_rows(self, statement) -> list[tuple]:
        """A parameterless SELECT's rows as the driver's own tuples: for whole-library reads
        (1M ids in 0.36-0.48 s here, 0.66-0.85 s as ORM scalars). Only for columns of plain
        types: no TypeDecorator (FilePath) runs on these values."""
        return self._driver_sql(str(statement.compile(dialect=self.engine.dialect)))

    def _driver_sql(self, sql: str) -> list[tuple]:
        with self.engine.connect() as conn:
            cursor = conn.connection.driver_connection.cursor()
            try:
                cursor.execute(sql)
                return cursor.fetchall()
            finally:
                cursor.close()

    def _vector_source(self, kind: str):
        """(a table with id and vector columns, its stored dtype) for `kind`.

        A reader of a library written before schema 4 that no writer has migrated yet reads
        the float32 `vector` column of the rows; once a writer has moved them (perhaps while
        this reader was open), the float16 vector tables.
        """
        if kind not in self._apart:
            name = "images" if kind == "image" else "captions"
            with self.engine.connect() as conn:
                legacy = "vector" in {c["name"] for c in inspect(conn).get_columns(name)}
            if legacy:
                from sqlalchemy import column, table

                return table(name, column("id"), column("vector")), np.dtype("<f4")
            self._apart.add(kind)
        return VECTOR_TABLES[kind].__table__, VECTOR_DTYPE

    def iter_vectors(self, kind: str, ids: Iterable[int] | None = None,
                     chunk: int = 4096, *, unit: bool = True
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, float32 vectors) chunks, for all rows (in id order) or the given ids.
        `unit=False`: float16 values not scaled to unit length (for float16 indexes)."""
        source, dtype = self._vector_source(kind)
        with self.session() as s:
            if ids is None:
                rows = s.execute(select(source.c.id, source.c.vector).order_by(source.c.id)
                                 .execution_options(yield_per=chunk))
                for part in rows.partitions(chunk):
                    yield _stack(part, dtype, unit)
                return
            wanted = [int(i) for i in ids]
            if dtype == VECTOR_DTYPE:  # re-ranking asks for a few hundred on every query
                for start in range(0, len(wanted), 900):
                    part = self._vector_rows(kind, wanted[start:start + 900])
                    if part:
                        yield _stack(part, dtype, unit)
                return
            for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
                part = s.execute(select(source.c.id, source.c.vector)
                                 .where(source.c.id.in_(wanted[start:start + 900]))).all()
                if part:
                    yield _stack(part, dtype, unit)

    def _vector_rows(self, kind: str, ids: list[int]) -> list[tuple]:
        """(id, blob) rows of these ids through the driver's own cursor: 200 random rows in
        ~1.0 ms here, 2.4-2.8 ms through SQLAlchemy (bench/scale.py re-ranks with them).
        The ids are ints, written into the SQL as literals."""
        table = VECTOR_TABLES[kind].__tablename__
        return self._driver_sql(
            f"SELECT id, vector FROM {table} WHERE id IN ({','.join(map(str, map(int, ids)))})")

    def add_vectors(self, session: Session, kind: str, ids: Iterable[int],
                    vectors: np.ndarray) -> None:
        """Store the vectors of rows just inserted (same transaction), as float16."""
        rows = [{"id": int(i), "vector": vector_blob(v)} for i, v in zip(ids, vectors)]
        if rows:
            session.execute(insert(VECTOR_TABLES[kind]), rows)

    def vectors_for(self, kind: str, ids: Iterable[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for chunk_ids, vectors in self.iter_vectors(kind, ids):
            out.update(zip(chunk_ids.tolist(), vectors))
        return out

    def count(self, kind: str) -> int:
        table = ImageRow if kind == "image" else CaptionRow
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(table)) or 0)

    # --- reads for the query side --------------------------------------------------------
    def image_paths(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> path of the given images (unknown ids are absent)."""
        out: dict[int, str] = {}
        with self.session() as s:
            for chunk in _chunks(ids):
                rows = s.execute(select(ImageRow.id, ImageRow.path).where(ImageRow.id.in_(chunk)))
                out.update((r.id, r.path) for r in rows)
        return out

    def captions(self, ids: Iterable[int]) -> dict[int, CaptionInfo]:
        """id -> caption with its linked image's id and path (unknown ids are absent)."""
        out: dict[int, CaptionInfo] = {}
        with self.session() as s:
            for chunk in _chunks(ids):
                rows = s.execute(select(CaptionRow.id, CaptionRow.text, CaptionRow.image_id,
                                        ImageRow.path)
                                 .outerjoin(ImageRow, ImageRow.id == CaptionRow.image_id)
                                 .where(CaptionRow.id.in_(chunk)))
                out.update((r.id, CaptionInfo(r.id, r.text, r.image_id, r.path)) for r in rows)
        return out

    def first_captions(self, image_ids: Iterable[int]) -> dict[int, str]:
        """One caption per image (its first added), for images that have one."""
        out: dict[int, str] = {}
        with self.session() as s:
            for chunk in _chunks(image_ids):
                first = (select(CaptionRow.image_id, func.min(CaptionRow.id).label("cid"))
                         .where(CaptionRow.image_id.in_(chunk)).group_by(CaptionRow.image_id)
                         .subquery())
                rows = s.execute(select(first.c.image_id, CaptionRow.text)
                                 .join(CaptionRow, CaptionRow.id == first.c.cid))
                out.update((r.image_id, r.text) for r in rows)
        return out

    def ids_with_hash(self, content_hash: str) -> set[int]:
        """Ids of the indexed images whose bytes hash to `content_hash` (copies of a file)."""
        with self.session() as s:
            return set(s.scalars(select(ImageRow.id)
                                 .where(ImageRow.content_hash == content_hash)))

    def image_file(self, image_id: int) -> ImageFile | None:
        with self.session() as s:
            row = s.execute(select(ImageRow.path, ImageRow.size, ImageRow.mtime_ns)
                            .where(ImageRow.id == image_id)).first()
        return ImageFile(image_id, row.path, row.size, row.mtime_ns) if row else None

    def caption_pairs(self) -> CaptionPairs:
        """Every caption linked to an indexed image, with both vectors, in caption id order."""
        text_source, dtype = self._vector_source("caption")
        image_source, _ = self._vector_source("image")
        # aliased: before schema 4 the sources are the captions and images tables themselves
        text_source = text_source.alias("caption_vector_")
        image_vectors = image_source.alias("image_vector_")
        statement = (select(CaptionRow.id, CaptionRow.image_id, text_source.c.vector,
                            image_vectors.c.vector.label("image_vector"))
                     .join(text_source, text_source.c.id == CaptionRow.id)
                     .join(image_vectors, image_vectors.c.id == CaptionRow.image_id)
                     .order_by(CaptionRow.id))
        with self.session() as s:
            rows = s.execute(statement).all()
        if not rows:
            empty = np.empty((0, 0), np.float32)
            return CaptionPairs(np.empty(0, np.int64), np.empty(0, np.int64), empty, empty)
        return CaptionPairs(np.array([r[0] for r in rows], np.int64),
                            np.array([r[1] for r in rows], np.int64),
                            _vectors_from_blobs([r[2] for r in rows], dtype),
                            _vectors_from_blobs([r[3] for r in rows], dtype))

    def failures(self) -> list[StoredFailure]:
        with self.session() as s:
            rows = s.scalars(select(FailureRow).order_by(FailureRow.path)).all()
        return [StoredFailure(r.path, r.reason, r.failed_at) for r in rows]

    # --- photo metadata ---------------------------------------------------------------------
    @property
    def has_meta_table(self) -> bool:
        """Whether the store has photo metadata at all (a library written before schema 2
        that no writer has opened since has none)."""
        return self.schema_version >= 2

    def meta_generation(self) -> tuple[int, int]:
        """Changes whenever any image's metadata may have: (image generation, meta generation)."""
        return self.generation("image"), self.generation("meta")

    def write_meta(self, session: Session, rows: Iterable[tuple[int, dict]]) -> int:
        """Set the metadata of these images (id, PhotoMeta.row()), replacing what was there."""
        rows = list(rows)
        if not rows:
            return 0
        ids = [image_id for image_id, _ in rows]
        for chunk in _chunks(ids):
            session.execute(delete(ImageMetaRow).where(ImageMetaRow.image_id.in_(chunk)))
        session.execute(insert(ImageMetaRow), [{"image_id": i, **row} for i, row in rows])
        self.bump_generation(session, "meta")
        return len(rows)

    def meta_complete(self, version: int) -> bool:
        """Whether every image has a metadata row of at least `version` (the usual case, so
        `index` and each watch batch skip looking for ones that do not)."""
        if not self.has_meta_table:
            return True
        with self.session() as s:
            current = s.scalar(select(func.count()).select_from(ImageMetaRow)
                               .where(ImageMetaRow.version >= version)) or 0
            images = s.scalar(select(func.count()).select_from(ImageRow)) or 0
        return current >= images

    def image_ids_under(self, folders: list[str], limit: int) -> np.ndarray | None:
        """Ids of the images that may lie below `folders` (a superset: callers still check
        each path), through the path index; None when there are more than `limit` (a filter
        that keeps that many is cheaper applied to the hits) or a folder's name is not UTF-8.
        """
        if not _all_utf8(folders):
            return None
        with self.session() as s:
            ids = s.scalars(select(ImageRow.id).where(under_condition(
                s, ImageRow.path, [f.rstrip(os.sep) or os.sep for f in folders]))
                .limit(limit + 1)).all()
        if len(ids) > limit:
            return None
        return np.unique(np.asarray(ids, dtype=np.int64))

    def images_needing_meta(self, version: int, paths: Iterable[str] | None = None
                            ) -> list[tuple[int, str, int]]:
        """(id, path, mtime_ns) of images with no metadata row, or one older than `version`;
        only among `paths` when given (a watch batch's few files, not the whole library)."""
        if not self.has_meta_table:
            return []
        query = (select(ImageRow.id, ImageRow.path, ImageRow.mtime_ns)
                 .outerjoin(ImageMetaRow, ImageMetaRow.image_id == ImageRow.id)
                 .where((ImageMetaRow.image_id.is_(None)) | (ImageMetaRow.version < version)))
        with self.session() as s:
            if paths is None:
                rows = s.execute(query).all()
            else:
                wanted, rows = list(paths), []
                for start in range(0, len(wanted), 500):
                    rows += s.execute(query.where(
                        ImageRow.path.in_(wanted[start:start + 500]))).all()
        return [(r.id, r.path, r.mtime_ns) for r in rows]

    def meta_columns(self) -> MetaColumns:
        """Every image's filterable metadata (images without a row have all None)."""
        columns: dict[str, list] = {name: [] for name in MetaColumns.__dataclass_fields__}
        if not self.has_meta_table:
            ids = sorted(self.ids("image").tolist())
            return MetaColumns(**{name: ids if name == "ids" else [None] * len(ids)
                                  for name in columns})
        names = [name for name in columns if name != "ids"]
        statement = (select(ImageRow.id, *[getattr(ImageMetaRow, n) for n in names])
                     .outerjoin(ImageMetaRow, ImageMetaRow.image_id == ImageRow.id)
                     .order_by(ImageRow.id))
        rows = self._driver_rows(statement)  # a million rows: ~2x faster than ORM rows
        if not rows:
            return MetaColumns(**columns)
        return MetaColumns(**{name: list(values)
                              for name, values in zip(["ids", *names], zip(*rows))})

    def image_meta(self, ids: Iterable[int]) -> dict[int, dict]:
        """id -> the image's metadata (META_FIELDS, width, height, bytes) for the ids given."""
        out: dict[int, dict] = {}
        with self.session() as s:
            for chunk in _chunks(ids):
                if self.has_meta_table:
                    statement = (select(ImageRow.id, ImageRow.width, ImageRow.height,
                                        ImageRow.size, *[getattr(ImageMetaRow, n)
                                                         for n in META_FIELDS])
                                 .outerjoin(ImageMetaRow, ImageMetaRow.image_id == ImageRow.id))
                else:
                    statement = select(ImageRow.id, ImageRow.width, ImageRow.height,
                                       ImageRow.size)
                for row in s.execute(statement.where(ImageRow.id.in_(chunk))):
                    values = dict(zip(META_FIELDS, row[4:])) if len(row) > 4 else \
                        dict.fromkeys(META_FIELDS)
                    out[row.id] = {**values, "width": row.width, "height": row.height,
                                   "bytes": row.size}
        return out

    def meta_summary(self) -> dict:
        """What `clipdex stats` says of the photos: date range, cameras, places, GPS."""
        if not self.has_meta_table:
            return {"with_metadata": 0, "taken": None, "cameras": {}, "places": {},
                    "with_gps": 0, "formats": {}}
        m = ImageMetaRow
        with self.session() as s:
            with_meta = s.scalar(select(func.count()).select_from(m)) or 0
            first, last = s.execute(select(func.min(m.taken_at), func.max(m.taken_at))).one()
            sources = dict(s.execute(select(m.taken_source, func.count())
                                     .group_by(m.taken_source)).all())
            cameras = s.execute(select(m.camera, func.count()).where(m.camera.is_not(None))
                                .group_by(m.camera).order_by(func.count().desc())).all()
            places = s.execute(select(m.city, m.country, func.count())
                               .where(m.country.is_not(None)).group_by(m.city, m.country)
                               .order_by(func.count().desc())).all()
            with_gps = s.scalar(select(func.count()).select_from(m)
                                .where(m.lat.is_not(None))) or 0
            formats = dict(s.execute(select(m.format, func.count()).group_by(m.format)).all())
        return {"with_metadata": int(with_meta),
                "taken": {"first": first, "last": last,
                          "sources": {k: v for k, v in sources.items() if k}}
                if first is not None else None,
                "cameras": {name: n for name, n in cameras},
                "places": {", ".join(p for p in (city, country) if p): n
                           for city, country, n in places},
                "with_gps": int(with_gps),
                "formats": {k: v for k, v in formats.items() if k}}

    # --- tags ---------------------------------------------------------------------------------
    @property
    def has_tag_table(self) -> bool:
        return self.schema_version >= 3

    def tag_vocabulary(self) -> str | None:
        """The vocabulary (index.tags.Vocabulary JSON) `clipdex tag` last used, if any."""
        return self.get_meta("tags.vocabulary") if self.has_tag_table else None

    def replace_tags(self, session: Session, rows: Iterable[tuple[int, str, str, float]], *,
                     image_ids: Iterable[int] | None = None) -> int:
        """Write (image id, group, label, score) rows; the tags of `image_ids` (all images
        when None) are dropped first."""
        if image_ids is None:
            session.execute(delete(ImageTagRow))
        else:
            for chunk in _chunks(image_ids):
                session.execute(delete(ImageTagRow).where(ImageTagRow.image_id.in_(chunk)))
        rows = [{"image_id": i, "grp": g, "label": label, "score": sc}
                for i, g, label, sc in rows]
        if rows:
            session.execute(insert(ImageTagRow), rows)
        self.bump_generation(session, "meta")
        return len(rows)

    def untagged_image_ids(self) -> list[int]:
        if not self.has_tag_table:
            return []
        with self.session() as s:
            tagged = select(ImageTagRow.image_id)
            return list(s.scalars(select(ImageRow.id).where(ImageRow.id.not_in(tagged))))

    def tag_ids(self) -> dict[str, np.ndarray]:
        """label (lower case) -> ascending ids of the images tagged with it."""
        if not self.has_tag_table:
            return {}
        out: dict[str, list[int]] = defaultdict(list)
        with self.session() as s:
            for image_id, label in s.execute(select(ImageTagRow.image_id, ImageTagRow.label)
                                             .order_by(ImageTagRow.image_id)):
                out[label.lower()].append(image_id)
        return {label: np.unique(np.array(ids, np.int64)) for label, ids in out.items()}

    def image_tags(self, ids: Iterable[int]) -> dict[int, list[tuple[str, str, float]]]:
        """id -> its (group, label, score) tags, best first within each group."""
        out: dict[int, list[tuple[str, str, float]]] = defaultdict(list)
        if not self.has_tag_table:
            return out
        with self.session() as s:
            for chunk in _chunks(ids):
                for row in s.execute(select(ImageTagRow.image_id, ImageTagRow.grp,
                                            ImageTagRow.label, ImageTagRow.score)
                                     .where(ImageTagRow.image_id.in_(chunk))
                                     .order_by(ImageTagRow.image_id, ImageTagRow.grp,
                                               ImageTagRow.score.desc())):
                    out[row.image_id].append((row.grp, row.label, float(row.score)))
        return out

    def tag_summary(self) -> dict[str, int]:
        """label -> how many images carry it, most first."""
        if not self.has_tag_table:
            return {}
        with self.session() as s:
            rows = s.execute(select(ImageTagRow.label, func.count()).group_by(ImageTagRow.label)
                             .order_by(func.count().desc(), ImageTagRow.label)).all()
        return {label: int(n) for label, n in rows}

    def caption_links(self) -> tuple[np.ndarray, np.ndarray]:
        """(caption ids, their linked image ids, -1 when unlinked), in caption id order."""
        with self.session() as s:
            rows = s.execute(select(CaptionRow.id, CaptionRow.image_id)
                             .order_by(CaptionRow.id)).all()
        return (np.array([r[0] for r in rows], np.int64),
                np.array([-1 if r[1] is None else r[1] for r in rows], np.int64))

    # --- captions ↔ images ------------------------------------------------------------------
    def link_captions(self, session: Session) -> int:
        """Link unlinked captions to images now indexed: by path, else by a unique file name.

        Returns how many were linked.
        """
        matched = select(ImageRow.id).where(ImageRow.path == CaptionRow.image_ref).scalar_subquery()
        linked = int(session.execute(
            update(CaptionRow).where(CaptionRow.image_id.is_(None),
                                     CaptionRow.image_ref.in_(select(ImageRow.path)))
            .values(image_id=matched).execution_options(synchronize_session=False)
        ).rowcount or 0)
        pending = session.execute(select(CaptionRow.id, CaptionRow.image_ref).where(
            CaptionRow.image_id.is_(None), CaptionRow.image_ref.is_not(None))).all()
        if not pending:
            return linked
        by_name = self._images_by_name(session, {os.path.basename(ref) for _, ref in pending})
        for caption_id, ref in pending:
            candidates = by_name.get(os.path.basename(ref), [])
            if len(candidates) == 1:
                session.execute(update(CaptionRow).where(CaptionRow.id == caption_id)
                                .values(image_id=candidates[0]))
                linked += 1
        return linked

    @staticmethod
    def _images_by_name(session: Session, names: set[str]) -> dict[str, list[int]]:
        """file name -> ids of the indexed images so named, for the names asked about."""
        by_name: dict[str, list[int]] = defaultdict(list)
        for image_id, image_path in session.execute(select(ImageRow.id, ImageRow.path)
                                                    .execution_options(yield_per=10_000)):
            if os.path.basename(image_path) in names:
                by_name[os.path.basename(image_path)].append(image_id)
        return by_name


def _chunks(ids: Iterable[int], size: int = 900) -> Iterator[list[int]]:
    """Lists of at most `size` ids: SQLite's bound-parameter limit."""
    wanted = sorted({int(i) for i in ids})
    for start in range(0, len(wanted), size):
        yield wanted[start:start + size]


IDS_CHUNK = 65_536  # rows per fetch in Store.ids

# libpq waits for a server that never answers (a firewalled host) as long as TCP does, about
# 2 minutes; a URL's own connect_timeout wins
PG_CONNECT_TIMEOUT_S = 10


def _engine(url: str) -> Engine:
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        options = {}
        if url.startswith("postgresql") and "connect_timeout=" not in url:
            options["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return create_engine(url, **options)
    except NoSuchModuleError:
        raise LibraryUnavailable(f"unknown database kind in {_redacted(url)}: give an "
                                 f"SQLAlchemy URL such as sqlite:///PATH or "
                                 f"postgresql+psycopg://USER@HOST/DB") from None
    except ArgumentError as exc:
        raise LibraryUnavailable(f"not a database URL: {url!r} ({exc})") from None
    except ModuleNotFoundError as exc:
        extra = " (pip install 'clipdex[postgres]')" if "psycopg" in str(exc.name) else ""
        raise LibraryUnavailable(f"the database driver for {_redacted(url)} is not installed: "
                                 f"no module {exc.name!r}{extra}") from None


class _database_errors:
    """Turn a database that cannot be reached or opened into one clear LibraryUnavailable."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, OperationalError):
            raise LibraryUnavailable(f"cannot open the database {_redacted(self.url)}: "
                                     f"{_first_line(exc)}") from None
        return False


def _first_line(exc: Exception) -> str:
    """The driver's own reason, first line only (libpq adds hints on further lines)."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


def _unavailable_database(url: str) -> Callable:
    """An engine's handle_error hook: a database that cannot be connected to, or whose
    connection was lost (a server restarted or gone), is a LibraryUnavailable naming the URL,
    whatever the store was doing; any other database error stays a bug, with its traceback.
    Nothing half-written survives: the transaction in flight dies with its connection."""

    def handle(context) -> None:
        from sqlalchemy.exc import OperationalError

        if not isinstance(context.sqlalchemy_exception, OperationalError):
            return
        reason = _first_line(context.original_exception)
        if context.connection is None:  # no connection was made
            raise LibraryUnavailable(f"cannot open the database {_redacted(url)}: {reason}")
        if context.is_disconnect:
            raise LibraryUnavailable(
                f"lost the connection to the database {_redacted(url)} ({reason}): what was "
                f"committed is kept, the rest was rolled back; try again")

    return handle


def _insert_for(session: Session):
    """The dialect's INSERT, which has ON CONFLICT (SQLite and PostgreSQL both spell it so)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert


# the PostgreSQL advisory lock a writer's open holds (keys are per database)
SCHEMA_LOCK_KEY = zlib.crc32(b"clipdex.schema")


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """One writer's open at a time on PostgreSQL (SQLite serialises writers itself): two
    writers opening one new library would otherwise both create its tables, and one fail on
    the other's half-made catalogue entries. Released on exit, or by the server when the
    process dies."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
            conn.commit()


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return repr(url)


MIGRATE_CHUNK = 8192


def _migrate_vectors(engine: Engine, notice: Callable[[str], None] | None) -> None:
    """Move a pre-schema-4 library's float32 `vector` columns into the float16 vector tables.

    One transaction per kind (copy, then drop the column), so a crash leaves that kind either
    as it was or migrated, and the next writer's open finishes the job. SQLite then compacts
    the file (VACUUM, at the new page size) to give the space back; a compaction that cannot
    run (no disk space for the copy, another process reading) is skipped with a notice and
    loses nothing.
    """
    columns = inspect(engine)
    legacy = [(kind, name) for kind, name in (("image", "images"), ("caption", "captions"))
              if "vector" in {c["name"] for c in columns.get_columns(name)}]
    if not legacy:
        return
    vector = {"image": ImageVectorRow, "caption": CaptionVectorRow}
    for kind, name in legacy:
        with engine.begin() as conn:
            total = conn.execute(text(f"SELECT count(*) FROM {name}")).scalar() or 0
            if notice:
                notice(f"moving {total} {kind} vectors to float16 (schema 4; once)")
            conn.execute(delete(vector[kind]))  # an earlier attempt rolled back; be sure
            last = -1
            while True:
                rows = conn.execute(text(f"SELECT id, vector FROM {name} WHERE id > :last "
                                         f"ORDER BY id LIMIT {MIGRATE_CHUNK}"),
                                    {"last": last}).all()
                if not rows:
                    break
                vectors = _vectors_from_blobs([r[1] for r in rows], np.dtype("<f4"))
                conn.execute(insert(vector[kind]), [
                    {"id": r[0], "vector": vector_blob(v)} for r, v in zip(rows, vectors)])
                last = rows[-1][0]
            conn.execute(text(f"ALTER TABLE {name} DROP COLUMN vector"))
    if engine.dialect.name == "sqlite":
        _compact_sqlite(engine, notice)


def _compact_sqlite(engine: Engine, notice: Callable[[str], None] | None) -> None:
    """VACUUM at SQLITE_PAGE_SIZE (a page size changes only outside WAL mode)."""
    if notice:
        notice("compacting the store")
    engine.dispose()  # WAL mode is left only by the database's one open connection
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        try:
            mode = raw.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if mode.lower() == "delete":
                raw.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
            elif notice:  # another process has the database open
                notice("the store keeps its page size (another process has it open); "
                       "compacting it as it is")
            raw.execute("VACUUM")
        except Exception as exc:  # sqlite3.OperationalError: full disk, busy, locked
            if notice:
                notice(f"the store was not compacted ({exc}); it works as it is, and its "
                       f"free pages are reused")
        finally:
            try:
                raw.execute("PRAGMA journal_mode=WAL")
            except Exception:  # busy: the next open's connect hook sets WAL again
                pass


def _widen_postgres_columns(engine: Engine) -> None:
    """Libraries made before 64-bit size/mtime columns had 32-bit ones on PostgreSQL."""
    columns = inspect(engine)
    with engine.begin() as connection:
        for table in ("images", "failures"):
            for column in columns.get_columns(table):
                if column["name"] in ("size", "mtime_ns") and \
                        column["type"].__class__.__name__ == "INTEGER":
                    connection.execute(text(
                        f"ALTER TABLE {table} ALTER COLUMN {column['name']} TYPE BIGINT"))


def failure_reason(reason: str) -> str:
    """A reason cut to fit its column (a reason may quote a long path or decoder message)."""
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 1] + "…"


def _stack(rows, dtype: np.dtype = VECTOR_DTYPE,
           unit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    return ids, _vectors_from_blobs([r[1] for r in rows], dtype, unit)


def check_model(recorded: str, requested: str) -> None:
    if recorded != requested:
        raise ModelMismatch(
            f"this library was built with model {recorded!r}; it cannot mix in vectors from "
            f"{requested!r}. Use --model {recorded} with this library, or start a new "
            f"library for the other model with --home DIR.")


def now() -> float:
    return time.time()
