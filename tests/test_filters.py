"""Photo metadata filters and the date sort: every hit satisfies the filter, and a filtered
search equals exact filtered brute force over the store's own vectors (tiny model, generated
scenes carrying EXIF); an existing library upgrades in place without re-embedding."""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
import retrieval.search as search_module
from index import Library
from index.errors import UsageProblem
from index.store import SCHEMA_VERSION
from index.synthetic.scenes import SCENE_CITIES, scene_meta, write_scenes
from retrieval import Searcher
from retrieval.filters import Filters, parse_near, parse_when
from retrieval.query import Query, Term

SCENES = 90
EPOCH = dt.datetime(1970, 1, 1)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("filters")
    photos = root / "photos"
    write_scenes(photos, SCENES, seed=5, size=64)
    with Library.open(root / "home") as lib:
        report = lib.index([photos], model="tiny")
        lib.add_captions(photos / "captions.jsonl")
    searcher = Searcher.open(root / "home")
    yield searcher, photos, report
    searcher.close()


def clock(text: str) -> float:
    return (dt.datetime.fromisoformat(text) - EPOCH).total_seconds()


# --- brute force, independent of retrieval.filters' MetaFrame -------------------------------
def all_meta(searcher: Searcher) -> dict[int, dict]:
    store = searcher.library.store
    return store.image_meta(store.ids("image").tolist())


def km(lat1, lon1, lat2, lon2) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + \
        math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(a))


def plain(text: str) -> str:
    """Without accents, lower case: "Reykjavík" → "reykjavik"."""
    return "".join(c for c in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(c)).lower()


def keeps(meta: dict, f: Filters) -> bool:
    """The filter's meaning, spelled out row by row."""
    taken = meta["taken_at"]
    if f.after is not None and (taken is None or taken < f.after):
        return False
    if f.before is not None and (taken is None or taken >= f.before):
        return False
    if f.camera and (meta["camera"] is None or plain(f.camera) not in plain(meta["camera"])):
        return False
    if f.place:
        names = [plain(n) for n in (meta["city"], meta["region"], meta["country"]) if n]
        code = (meta["country_code"] or "").lower()
        if not (plain(f.place) == code or any(plain(f.place) in n for n in names)):
            return False
    if f.near:
        if meta["lat"] is None or km(f.near[0], f.near[1], meta["lat"], meta["lon"]) > f.near[2]:
            return False
    if f.types and meta["format"] not in f.types:
        return False
    return True


def brute_force(searcher: Searcher, vector: np.ndarray, f: Filters, target: str,
                k: int) -> list[tuple[int, float]]:
    store = searcher.library.store
    meta = all_meta(searcher)
    allowed = {i for i, m in meta.items() if keeps(m, f)}
    kind = "image" if target == "images" else "caption"
    ids, vectors = zip(*[(i, v) for chunk_ids, chunk in store.iter_vectors(kind)
                         for i, v in zip(chunk_ids.tolist(), chunk)])
    if kind == "caption":
        links = store.captions(list(ids))
        keep = [n for n, i in enumerate(ids) if links[i].image_id in allowed]
    else:
        keep = [n for n, i in enumerate(ids) if i in allowed]
    scores = np.stack(vectors)[keep] @ vector
    order = np.argsort(-scores, kind="stable")[:k]
    return [(ids[keep[n]], float(scores[n])) for n in order]


FILTERS = [
    {"camera": "canon"},
    {"camera": "IPHONE 13"},
    {"place": "Lisbon"},
    {"place": "jp"},
    {"place": "reykjavik"},  # accents ignored: Reykjavík
    {"year": "2021"},
    {"after": "2020-03-01", "before": "2022-07-01"},
    {"month": "2023-06"},
    {"near": "38.7223,-9.1393,5"},
    {"near": "35.68,139.65"},
    {"types": ["png"]},
    {"types": "jpg"},
    {"camera": "nikon", "after": "2021"},
    {"place": "Paris", "types": ["jpeg"], "before": "2024"},
]


@pytest.mark.parametrize("values", FILTERS, ids=[json.dumps(f) for f in FILTERS])
@pytest.mark.parametrize("target", ["images", "captions"])
def test_filtered_search_equals_brute_force(library, values: dict, target: str) -> None:
    searcher, _, _ = library
    filters = Filters.parse(**values)
    vector, _ = searcher.query_vector((Term.text("a red circle"),))
    expected = brute_force(searcher, vector, filters, target, 8)
    result = searcher.search("a red circle", target=target, k=8, **values)
    assert [h.id for h in result.hits] == [i for i, _ in expected]
    assert [h.score for h in result.hits] == pytest.approx([s for _, s in expected], abs=1e-5)
    meta = all_meta(searcher)
    for hit in result.hits:
        assert keeps(meta[hit.image_id], filters), (hit, meta[hit.image_id])


def test_the_fixture_has_something_for_every_filter(library) -> None:
    """Each filter above keeps some photos but not all (else the comparison proves little)."""
    searcher, _, _ = library
    meta = all_meta(searcher)
    for values in FILTERS:
        kept = sum(keeps(m, Filters.parse(**values)) for m in meta.values())
        assert 0 < kept < SCENES, values


@pytest.mark.parametrize("exact_max", [0, 10**9])
def test_both_search_paths_equal_brute_force(library, monkeypatch, exact_max: int) -> None:
    """Above EXACT_FILTER_MAX ids the index searches with an IDSelector; at or below, the
    allowed vectors are scored one by one: on a Flat index both are exact."""
    searcher, _, _ = library
    monkeypatch.setattr(search_module, "EXACT_FILTER_MAX", exact_max)
    for values in ({"camera": "sony"}, {"types": ["jpeg"]}):
        filters = Filters.parse(**values)
        vector, _ = searcher.query_vector((Term.text("two blue squares"),))
        expected = [i for i, _ in brute_force(searcher, vector, filters, "images", 6)]
        assert [h.id for h in searcher.search("two blue squares", k=6, **values).hits] == \
            expected


def test_a_selective_filter_is_not_a_post_filter(library) -> None:
    """The best matches among the few photos that pass, however low they rank overall."""
    searcher, _, _ = library
    meta = all_meta(searcher)
    lisbon = [i for i, m in meta.items() if m["city"] == "Lisbon"]
    result = searcher.search("a red circle", place="Lisbon", k=50)
    assert sorted(h.id for h in result.hits) == sorted(lisbon)


def test_image_query_mixture_and_negatives_with_filters(library) -> None:
    searcher, photos, _ = library
    query_image = photos / "scene_00000.jpg"
    result = searcher.search("2:a green square", image=[query_image], negatives=["circle"],
                             camera="apple", k=5)
    vector, exclude = searcher.query_vector(result.query.terms)
    expected = [i for i, _ in brute_force(searcher, vector, Filters.parse(camera="apple"),
                                          "images", 5 + len(exclude)) if i not in exclude][:5]
    assert [h.id for h in result.hits] == expected


def test_filters_with_under_threshold_and_dedup(library) -> None:
    searcher, photos, _ = library
    result = searcher.search("a circle", under=photos, threshold=0.1, dedup=True,
                             year="2022", k=20)
    meta = all_meta(searcher)
    assert result.hits
    for hit in result.hits:
        assert hit.score >= 0.1 and hit.path.startswith(str(photos))
        assert "2022-01-01" <= hit.meta["taken_at"][:10] <= "2022-12-31"
        assert keeps(meta[hit.id], Filters.parse(year="2022"))


def test_sort_by_date_orders_the_relevant_hits(library) -> None:
    searcher, _, _ = library
    relevant = searcher.search("a yellow star", k=10)
    for sort, reverse in (("date", False), ("-date", True)):
        dated = searcher.search("a yellow star", k=10, sort=sort)
        assert sorted(h.id for h in dated.hits) == sorted(h.id for h in relevant.hits)
        times = [h.meta["taken_at"][:19] for h in dated.hits]
        assert times == sorted(times, reverse=reverse)


def test_browse_with_filters_alone_lists_newest_first(library) -> None:
    searcher, _, _ = library
    meta = all_meta(searcher)
    result = searcher.search(place="Lisbon", after="2019-06-01", k=100)
    expected = [i for i, m in meta.items() if keeps(m, Filters.parse(place="Lisbon",
                                                                       after="2019-06-01"))]
    assert expected and sorted(h.id for h in result.hits) == sorted(expected)
    times = [meta[h.id]["taken_at"] for h in result.hits]
    assert times == sorted(times, reverse=True)
    assert all(h.score is None for h in result.hits)
    assert result.query.sort == "-date"  # the order the listing is in, echoed
    oldest = searcher.search(place="Lisbon", after="2019-06-01", k=100, sort="date")
    assert [h.id for h in oldest.hits] == [h.id for h in result.hits][::-1]
    page = searcher.search(place="Lisbon", after="2019-06-01", k=2, offset=1)
    assert [h.id for h in page.hits] == [h.id for h in result.hits][1:3]


def test_browse_everything_by_date(library) -> None:
    searcher, _, _ = library
    result = searcher.search(sort="date", k=SCENES)
    assert len(result.hits) == SCENES
    times = [h.meta["taken_at"][:19] for h in result.hits]
    assert times == sorted(times)


def test_an_empty_query_without_filters_is_a_usage_error() -> None:
    with pytest.raises(UsageProblem, match="empty query"):
        Query(())
    with pytest.raises(UsageProblem, match="--threshold needs a query"):
        Query((), filters=Filters(camera="x"), threshold=0.2)
    with pytest.raises(UsageProblem, match="captions"):
        Query((), filters=Filters(camera="x"), target="captions")


def test_hits_carry_the_photo_metadata(library) -> None:
    searcher, photos, _ = library
    result = searcher.search(camera="canon", k=100)
    assert result.hits
    for hit in result.hits:
        number = int(Path(hit.path).stem.split("_")[1])
        written = scene_meta(number, seed=5)
        meta = hit.meta
        assert written is not None and meta["camera"] == "Canon EOS R5"
        assert meta["taken_at"].startswith(written.taken.isoformat())
        assert meta["taken_at_source"] == "DateTimeOriginal"
        assert meta["lens"] == written.lens
        assert (meta["width"], meta["height"], meta["format"]) == (64, 64, "jpeg")
        assert meta["bytes"] == (photos / hit.path).stat().st_size
        if written.city:
            assert meta["city"] == written.city and meta["lat"] == pytest.approx(written.lat)
            assert meta["taken_at"].endswith(written.offset)
        else:
            assert meta["lat"] is None and meta["place"] is None


def test_scene_places_geocode_to_their_cities(library) -> None:
    searcher, _, report = library
    meta = all_meta(searcher)
    cities = {m["city"] for m in meta.values() if m["city"]}
    assert cities == {name for name, *_ in SCENE_CITIES}
    assert report.metadata["with_gps"] == report.metadata["with_place"] > 0
    assert report.metadata["unusable"] == {}


# --- parsing ---------------------------------------------------------------------------------
def test_dates_name_spans_of_clock_time() -> None:
    assert parse_when("2024", "--after") == (clock("2024-01-01"), clock("2025-01-01"))
    assert parse_when("2024-12", "--after") == (clock("2024-12-01"), clock("2025-01-01"))
    assert parse_when("2024-02-29", "--x") == (clock("2024-02-29"), clock("2024-03-01"))
    assert parse_when("2024-06-01T14:30", "--x") == (clock("2024-06-01T14:30"),
                                                      clock("2024-06-01T14:31"))
    f = Filters.parse(after="2024-06-01", before="2024-07-01", year="2024")
    assert (f.after, f.before) == (clock("2024-06-01"), clock("2024-07-01"))
    assert Filters.parse(month="2023-06").as_dict()["before"] == "2023-07-01T00:00:00"


@pytest.mark.parametrize(("values", "message"), [
    ({"after": "yesterday-ish"}, "--after: 'yesterday-ish' is not a date"),
    ({"before": "2024-02-30"}, "--before: '2024-02-30' is not a date"),
    ({"after": "2024-06-01T10:00+02:00"}, "without a UTC offset"),
    ({"year": "24"}, "--year: give a year such as 2024"),
    ({"month": "2024-13"}, "--month"),
    ({"near": "200,0"}, "--near: give LAT,LON or LAT,LON,KM"),
    ({"near": "38.7,-9.1,0"}, "--near"),
    ({"near": "38.7"}, "--near"),
    ({"near": "nan,1"}, "--near"),
    ({"types": ["jpeg", "raw"]}, "--type: unknown image type 'raw'"),
    ({"after": "2022", "before": "2021"}, "--after, --before: these dates leave no time"),
    ({"year": "2021", "after": "2022-01-01"}, "--after, --year: these dates leave no time"),
])
def test_bad_filter_values_are_usage_errors(values: dict, message: str) -> None:
    with pytest.raises(UsageProblem, match=message.replace("(", r"\(").replace("+", r"\+")):
        Filters.parse(**values)


def test_near_defaults_to_ten_km() -> None:
    assert parse_near("38.72,-9.14") == (38.72, -9.14, 10.0)


# --- the CLI ---------------------------------------------------------------------------------
def run(home: Path, *args: str):
    return CliRunner().invoke(cli.main, ["--home", str(home), *args])


@pytest.mark.parametrize("args", [["--after", "yesterday-ish"], ["--near", "200,0"],
                                  ["a", "--type", "raw"], ["a", "--month", "2024-13"],
                                  ["--sort", "newest"]])
def test_cli_bad_filters_exit_2_with_the_accepted_form(library, args: list[str]) -> None:
    searcher, _, _ = library
    result = run(searcher.library.settings.home, "search", *args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output


def test_cli_json_hits_have_meta_and_the_table_dates_and_cameras(library) -> None:
    searcher, _, _ = library
    home = searcher.library.settings.home
    as_json = run(home, "search", "a red circle", "--camera", "canon", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["query"]["filters"]["camera"] == "canon"
    assert set(data["hits"][0]["meta"]) >= {"taken_at", "taken_at_source", "camera", "lens",
                                            "lat", "lon", "place", "width", "height",
                                            "format", "bytes"}
    table = run(home, "search", "a red circle", "--camera", "canon").output.splitlines()
    assert len(table) == len(data["hits"])
    for line, hit in zip(table, data["hits"]):
        assert hit["meta"]["taken_at"][:16].replace("T", " ") in line
        assert "Canon EOS R5" in line and line.endswith(hit["path"])


def test_cli_browse_and_stats(library) -> None:
    searcher, _, _ = library
    home = searcher.library.settings.home
    listed = run(home, "search", "--place", "Tokyo", "--paths")
    assert listed.exit_code == 0 and listed.output.strip()
    meta = all_meta(searcher)
    tokyo = {m["city"] for i, m in meta.items()
             if searcher.library.store.image_paths([i])[i] in listed.output.split()}
    assert tokyo == {"Tokyo"}
    stats = run(home, "stats")
    assert stats.exit_code == 0
    assert "cameras:  " in stats.output and "Canon EOS R5" in stats.output
    assert "places:   " in stats.output and "gps:      " in stats.output
    data = json.loads(run(home, "stats", "--json").output)["photos"]
    assert data["with_metadata"] == SCENES and data["with_gps"] > 0
    assert set(data["cameras"]) == {"Canon EOS R5", "Nikon D750", "Sony ILCE-7M3",
                                    "Apple iPhone 13", "Fujifilm X-T4"}


# --- an existing library upgrades in place -----------------------------------------------
# What schema 1 (clipdex before photo metadata, commit 4e437a0) made in SQLite: these names
# were read from a library that commit wrote
SCHEMA_1 = {
    "meta", "images", "sqlite_sequence", "ix_images_path_prefix", "ix_images_content_hash",
    "failures", "captions", "ix_captions_image_ref", "ix_captions_image_id",
    "sqlite_autoindex_meta_1", "sqlite_autoindex_images_1", "sqlite_autoindex_failures_1",
    "sqlite_autoindex_captions_1",
}


def _downgrade_to_schema_1(db: Path) -> None:
    with sqlite3.connect(db) as connection:
        _vectors_back_in_rows(connection)
        connection.execute("DROP TABLE image_meta")
        connection.execute("DROP TABLE image_tags")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        connection.execute("DELETE FROM meta WHERE key = 'generation.meta'")
        # schema 1 also indexed the path twice (today's writers drop the second)
        connection.execute("CREATE INDEX ix_images_path_prefix ON images (path)")
    with sqlite3.connect(db) as connection:
        names = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
    assert names == SCHEMA_1  # exactly what schema 1 had, nothing of schema 2 left


def _vectors_back_in_rows(connection: sqlite3.Connection) -> None:
    """Schema 1-3 kept each float32 vector in its image or caption row."""
    for table in ("images", "captions"):
        singular = table[:-1]
        connection.execute(f"ALTER TABLE {table} ADD COLUMN vector BLOB")
        rows = connection.execute(f"SELECT id, vector FROM {singular}_vectors").fetchall()
        connection.executemany(
            f"UPDATE {table} SET vector = ? WHERE id = ?",
            [(np.frombuffer(blob, "<f2").astype(np.float32).tobytes(), i) for i, blob in rows])
        connection.execute(f"DROP TABLE {singular}_vectors")


def test_a_schema_1_library_gains_metadata_without_re_embedding(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 12, seed=2, size=64)
    with Library.open(tmp_path / "home") as lib:
        lib.index([photos], model="tiny")
        before = {i: v.tobytes() for ids, vs in lib.store.iter_vectors("image")
                  for i, v in zip(ids.tolist(), vs)}
    _downgrade_to_schema_1(tmp_path / "home" / "library.db")

    searcher = Searcher.open(tmp_path / "home")  # a reader writes nothing
    assert searcher.search("a red circle", k=3).hits  # plain search works as before
    with pytest.raises(UsageProblem, match="no photo metadata yet"):
        searcher.search("a red circle", camera="canon")
    searcher.close()

    with Library.open(tmp_path / "home") as lib:
        report = lib.index([photos])
        after = {i: v.tobytes() for ids, vs in lib.store.iter_vectors("image")
                 for i, v in zip(ids.tolist(), vs)}
        assert lib.store.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert (report.new, report.changed, report.unchanged) == (0, 0, 12)
    assert report.metadata["updated_without_embedding"] == 12
    assert after == before  # same ids, same vectors: nothing was embedded again
    searcher = Searcher.open(tmp_path / "home")
    written = [n for n in range(12) if scene_meta(n, seed=2)]
    canon = [n for n in written if scene_meta(n, seed=2).make == "Canon"]
    hits = searcher.search(camera="canon", k=12).hits
    assert sorted(Path(h.path).name for h in hits) == sorted(f"scene_{n:05d}.jpg" for n in canon)
    searcher.close()
    with Library.open(tmp_path / "home") as lib:  # and once read, never again
        assert lib.index([photos]).metadata["updated_without_embedding"] == 0


def test_deleted_photos_take_their_metadata_with_them(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 6, seed=2, size=64)
    with Library.open(tmp_path / "home") as lib:
        lib.index([photos], model="tiny")
        (photos / "scene_00000.jpg").unlink()
        lib.index([photos])
        assert len(lib.store.meta_columns().ids) == 5
        with lib.store.session() as s:
            from sqlalchemy import func, select

            from index.store import ImageMetaRow
            assert s.scalar(select(func.count()).select_from(ImageMetaRow)) == 5


# --- HTTP -------------------------------------------------------------------------------------
def test_http_filters_sort_and_browse(library) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.server import create_app

    searcher, _, _ = library
    client = TestClient(create_app(searcher), base_url="http://127.0.0.1")
    listed = client.get("/api/search", params={"place": "Lisbon", "top": 50})
    assert listed.status_code == 200, listed.text
    direct = searcher.search(place="Lisbon", k=50)
    assert [h["id"] for h in listed.json()["hits"]] == [h.id for h in direct.hits]
    assert all(h["score"] is None and h["meta"]["city"] == "Lisbon"
               for h in listed.json()["hits"])
    body = {"text": "a red circle", "camera": "nikon", "year": 2021, "sort": "-date",
            "type": ["jpeg"], "target": "captions"}
    posted = client.post("/api/search", json=body)
    assert posted.status_code == 200, posted.text
    expected = searcher.search("a red circle", camera="nikon", year="2021", sort="-date",
                               types=["jpeg"], target="captions")
    assert [h["id"] for h in posted.json()["hits"]] == [h.id for h in expected.hits]
    bad = client.post("/api/search", json={"text": "x", "near": "200,0"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("near: give LAT,LON")
    bad = client.get("/api/search", params={"after": "yesterday-ish"})
    assert bad.status_code == 400 and "after: 'yesterday-ish'" in bad.json()["error"]
    offered = client.get("/api/filters").json()
    assert "Canon EOS R5" in offered["cameras"] and "Lisbon" in offered["places"]
    assert set(offered["types"]) == {"jpeg", "png"}
    # clip-retrieval's endpoint keeps ignoring what it does not know
    knn = client.post("/knn-service", json={"text": "a red circle", "camera": "nikon",
                                            "num_images": 3, "modality": "image"})
    assert knn.status_code == 200 and len(knn.json()) == 3


# --- hostile metadata in a real run ---------------------------------------------------------
def _jpeg(path: Path, *, base: dict | None = None, details: dict | None = None,
          gps: dict | None = None) -> Path:
    from PIL import Image

    exif = Image.Exif()
    for tag, value in (base or {}).items():
        exif[tag] = value
    for tag, value in (details or {}).items():
        exif.get_ifd(0x8769)[tag] = value
    for tag, value in (gps or {}).items():
        exif.get_ifd(0x8825)[tag] = value
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path, exif=exif)
    return path


def test_hostile_metadata_is_counted_and_never_stops_indexing(tmp_path: Path) -> None:
    from PIL.TiffImagePlugin import IFDRational

    photos = tmp_path / "photos"
    photos.mkdir()
    _jpeg(photos / "good.jpg", base={0x010F: "Canon", 0x0110: "Canon EOS R5"},
          details={0x9003: "2021:06:01 14:03:00"})
    _jpeg(photos / "zero-date.jpg", details={0x9003: "0000:00:00 00:00:00"})
    _jpeg(photos / "lat-95.jpg", gps={1: "N", 2: (IFDRational(95), IFDRational(0),
                                                   IFDRational(0)), 3: "E", 4: (1.0, 0.0, 0.0)})
    _jpeg(photos / "zero-denominator.jpg", gps={1: "N", 2: (IFDRational(1, 0), 0.0, 0.0),
                                                 3: "E", 4: (1.0, 0.0, 0.0)})
    _jpeg(photos / "orientation-9.jpg", base={0x0112: 9})
    _jpeg(photos / "latin1-make.jpg", base={0x010F: b"Cam\xe9ra", 0x0110: "X1"})
    _jpeg(photos / "maker-note.jpg", base={0x010F: "Sony"},
          details={0x927C: bytes(range(256)) * 240, 0x9003: "2020:01:02 03:04:05"})
    result = run(tmp_path / "home", "index", str(photos), "--model", "tiny", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["new"], report["failed"]) == (7, 0)
    assert report["metadata"]["unusable"] == {"camera": 1, "gps": 2, "orientation": 1,
                                              "taken_at": 1}
    searcher = Searcher.open(tmp_path / "home")
    meta = {Path(searcher.library.store.image_paths([i])[i]).name: m
            for i, m in all_meta(searcher).items()}
    searcher.close()
    assert meta["good.jpg"]["camera"] == "Canon EOS R5"
    assert meta["zero-date.jpg"]["taken_source"] == "mtime"  # the bad date falls back
    assert meta["lat-95.jpg"]["lat"] is None and meta["zero-denominator.jpg"]["lat"] is None
    assert meta["latin1-make.jpg"]["make"] is None and meta["latin1-make.jpg"]["model"] == "X1"
    assert meta["maker-note.jpg"]["camera"] == "Sony"
    assert meta["maker-note.jpg"]["taken_source"] == "DateTimeOriginal"
    assert (meta["orientation-9.jpg"]["width"], meta["orientation-9.jpg"]["height"]) == (48, 40)


def test_near_across_the_antimeridian_and_at_the_pole() -> None:
    from index.store import MetaColumns
    from retrieval.filters import MetaFrame

    points = [(0.0, 179.9), (0.0, -179.9), (0.0, 178.0), (89.95, 10.0), (89.95, -170.0),
              (None, None)]
    n = len(points)
    frame = MetaFrame(MetaColumns(
        ids=list(range(1, n + 1)), taken_at=[0.0] * n, camera=[None] * n,
        country_code=[None] * n, country=[None] * n, region=[None] * n, city=[None] * n,
        lat=[p[0] for p in points], lon=[p[1] for p in points], format=["jpeg"] * n))
    assert frame.select(Filters(near=(0.0, 180.0, 50.0))).tolist() == [1, 2]
    assert frame.select(Filters(near=(0.0, -180.0, 300.0))).tolist() == [1, 2, 3]
    assert frame.select(Filters(near=(90.0, 0.0, 20.0))).tolist() == [4, 5]
