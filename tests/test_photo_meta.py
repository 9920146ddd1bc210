"""Photo metadata from EXIF (index/photo_meta.py), read from real files written with Pillow.

Every hostile case is a real JPEG read both ways an image's metadata is read: the header only
(`read_file_meta`, for an existing library) and with the pixels (`decode_file(meta=True)`,
while indexing). Either way the image must come back, the bad field must be empty and named in
`problems`, and the good fields around it must survive.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
import struct
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational as R

from index.photo_meta import (
    Place,
    camera_name,
    clock_seconds,
    fold,
    iso_time,
    maker_name,
    places_for,
    read_file_meta,
)
from index.scan import decode_file
from index.synthetic.scenes import scene_meta, write_scenes

EXIF_IFD, GPS_IFD, MAKER_NOTE = 0x8769, 0x8825, 0x927C
MAKE, MODEL, ORIENTATION = 0x010F, 0x0110, 0x0112
ORIGINAL, DIGITIZED, OFFSET_ORIGINAL, OFFSET_DIGITIZED = 0x9003, 0x9004, 0x9011, 0x9012
LENS_MODEL = 0xA434
SIZE = (64, 48)
MTIME = 1_600_000_000  # 2020-09-13 12:26:40 UTC: far from every EXIF date used here

# The good photo every hostile case starts from: one field is then broken at a time.
GOOD_BASE = {MAKE: "Canon", MODEL: "Canon EOS R5"}
GOOD_EXIF = {ORIGINAL: "2021:06:01 14:03:00", OFFSET_ORIGINAL: "+01:00",
             LENS_MODEL: "RF24-105mm F4 L IS USM"}
GOOD_GPS = {1: "N", 2: (R(38, 1), R(43, 1), R(2028, 100)),  # 38°43'20.28" N = 38.7223
            3: "W", 4: (R(9, 1), R(8, 1), R(2148, 100)),  # 9°08'21.48" W = -9.1393
            5: b"\x00", 6: R(42, 1)}
GOOD = {"taken_at": clock_seconds(dt.datetime(2021, 6, 1, 14, 3)), "taken_offset": 60,
        "taken_source": "DateTimeOriginal", "make": "Canon", "model": "Canon EOS R5",
        "camera": "Canon EOS R5", "lens": "RF24-105mm F4 L IS USM", "lat": 38.7223,
        "lon": -9.1393, "alt": 42.0}


# --- helpers ---------------------------------------------------------------------------------
def _exif(base: dict, exif_ifd: dict, gps: dict) -> Image.Exif:
    exif = Image.Exif()
    for tag, value in base.items():
        exif[tag] = value
    if exif_ifd:
        exif.get_ifd(EXIF_IFD).update(exif_ifd)
    if gps:
        exif.get_ifd(GPS_IFD).update(gps)
    return exif


def _merged(good: dict, changes: dict | None) -> dict:
    out = dict(good)
    for tag, value in (changes or {}).items():
        if value is None:
            out.pop(tag, None)
        else:
            out[tag] = value
    return out


def _photo(path: Path, *, base: dict | None = None, exif_ifd: dict | None = None,
           gps: dict | None = None, mtime: float = MTIME, **save) -> Path:
    """A JPEG with the good metadata, changed by `base`/`exif_ifd`/`gps` (None deletes)."""
    exif = _exif(_merged(GOOD_BASE, base), _merged(GOOD_EXIF, exif_ifd), _merged(GOOD_GPS, gps))
    Image.new("RGB", SIZE, (200, 30, 30)).save(path, exif=exif, **save)
    os.utime(path, (mtime, mtime))
    return path


def _read_both(path: Path):
    """(read_file_meta, decode_file meta) of one file; the decode must give the image."""
    st = os.stat(path)
    header = read_file_meta(str(path), st.st_mtime_ns)
    decoded = decode_file(str(path), min_side=32, meta=True)
    assert decoded.image is not None
    assert decoded.image.size == (decoded.width, decoded.height)
    assert decoded.meta == header  # problems are left out of PhotoMeta's equality
    assert decoded.meta.problems == header.problems
    return header, decoded


def _assert_good(meta, *, but: tuple[str, ...] = ()) -> None:
    """Every field of the good photo is read as written, except those named in `but`."""
    for name, want in GOOD.items():
        if name in but:
            continue
        got = getattr(meta, name)
        if isinstance(want, float) and name in ("lat", "lon"):
            assert got == pytest.approx(want, abs=1e-6), name
        else:
            assert got == want, name
    assert meta.format == "jpeg"


def _mtime_clock(mtime: float) -> float:
    return clock_seconds(dt.datetime.fromtimestamp(mtime))


def _raw_exif(ifd0: list[tuple[int, int, int, bytes]],
              gps: list[tuple[int, int, int, bytes]]) -> bytes:
    """An APP1 Exif payload built by hand (big-endian TIFF), for values Pillow cannot write:
    entries are (tag, TIFF type, count, value bytes)."""
    ifd0 = ifd0 + [(GPS_IFD, 4, 1, b"")]  # the pointer, filled in below
    gps_offset = 8 + 2 + 12 * len(ifd0) + 4
    data_offset = gps_offset + 2 + 12 * len(gps) + 4
    data = bytearray()

    def directory(entries) -> bytes:
        out = struct.pack(">H", len(entries))
        for tag, kind, count, value in sorted(entries):
            if tag == GPS_IFD:
                value = struct.pack(">I", gps_offset)
            if len(value) <= 4:
                out += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\x00")
            else:
                out += struct.pack(">HHII", tag, kind, count, data_offset + len(data))
                data.extend(value + b"\x00" * (len(value) % 2))
        return out + b"\x00\x00\x00\x00"

    head = directory(ifd0) + directory(gps)
    return b"Exif\x00\x00MM\x00*" + struct.pack(">I", 8) + head + bytes(data)


def _rationals(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">II", n, d) for n, d in pairs)


def _app1(data: bytes) -> tuple[int, int]:
    """(start, end) of the Exif APP1 segment's payload in a JPEG's bytes."""
    start = data.index(b"\xff\xe1")
    length = struct.unpack(">H", data[start + 2:start + 4])[0]
    assert data[start + 4:start + 10] == b"Exif\x00\x00"
    return start + 4, start + 2 + length


def _with_app1(data: bytes, payload: bytes) -> bytes:
    """The JPEG with its Exif APP1 payload replaced (the segment length fixed: still a JPEG)."""
    start, end = _app1(data)
    return data[:start - 2] + struct.pack(">H", len(payload) + 2) + payload + data[end:]


@pytest.fixture
def india_time():
    """This process's local time zone at UTC+05:30 (a POSIX TZ, no tzdata needed)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "IST-5:30"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


# --- 1. capture time, normal cases ------------------------------------------------------------
def test_date_time_original_with_its_offset(tmp_path):
    meta, decoded = _read_both(_photo(tmp_path / "a.jpg"))
    _assert_good(meta)
    assert meta.problems == ()
    assert iso_time(meta.taken_at, meta.taken_offset) == "2021-06-01T14:03:00+01:00"
    assert (decoded.width, decoded.height) == SIZE


def test_original_wins_over_digitized(tmp_path):
    path = _photo(tmp_path / "a.jpg", exif_ifd={DIGITIZED: "2020:01:02 03:04:05",
                                                 OFFSET_DIGITIZED: "-05:00"})
    meta, _ = _read_both(path)
    _assert_good(meta)


def test_date_time_digitized_when_original_is_missing(tmp_path):
    path = _photo(tmp_path / "a.jpg", exif_ifd={ORIGINAL: None, OFFSET_ORIGINAL: None,
                                                 DIGITIZED: "2020:01:02 03:04:05",
                                                 OFFSET_DIGITIZED: "-05:30"})
    meta, _ = _read_both(path)
    assert meta.taken_source == "DateTimeDigitized"
    assert meta.taken_at == clock_seconds(dt.datetime(2020, 1, 2, 3, 4, 5))
    assert meta.taken_offset == -330
    assert iso_time(meta.taken_at, meta.taken_offset) == "2020-01-02T03:04:05-05:30"
    assert meta.problems == ()
    _assert_good(meta, but=("taken_at", "taken_offset", "taken_source"))


def test_digitized_is_not_given_the_original_offset(tmp_path):
    path = _photo(tmp_path / "a.jpg", exif_ifd={ORIGINAL: None,
                                                 DIGITIZED: "2020:01:02 03:04:05"})
    meta, _ = _read_both(path)
    assert meta.taken_source == "DateTimeDigitized"
    assert meta.taken_offset is None  # OffsetTimeOriginal belongs to the missing Original
    assert iso_time(meta.taken_at, meta.taken_offset) == "2020-01-02T03:04:05"


def test_file_mtime_when_there_is_no_exif_date(tmp_path):
    mtime = MTIME + 0.25
    path = _photo(tmp_path / "a.jpg", exif_ifd={ORIGINAL: None, OFFSET_ORIGINAL: None},
                  mtime=mtime)
    meta, _ = _read_both(path)
    assert meta.taken_source == "mtime"
    assert meta.taken_at == pytest.approx(_mtime_clock(mtime), abs=1e-3)
    local = dt.datetime.fromtimestamp(mtime).astimezone()
    assert meta.taken_offset == local.utcoffset().total_seconds() // 60
    assert meta.problems == ()
    _assert_good(meta, but=("taken_at", "taken_offset", "taken_source"))


def test_mtime_is_this_machines_local_clock(tmp_path, india_time):
    mtime = 1_622_556_180  # 2021-06-01 14:03:00 UTC = 19:33 in India
    path = _photo(tmp_path / "a.jpg", exif_ifd={ORIGINAL: None}, mtime=mtime)
    meta, _ = _read_both(path)
    assert meta.taken_source == "mtime"
    assert meta.taken_at == clock_seconds(dt.datetime(2021, 6, 1, 19, 33))
    assert meta.taken_at == _mtime_clock(mtime)
    assert meta.taken_offset == 330
    assert iso_time(meta.taken_at, meta.taken_offset) == "2021-06-01T19:33:00+05:30"


def test_png_without_exif(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", SIZE, (0, 90, 200)).save(path)
    os.utime(path, (MTIME, MTIME))
    meta, decoded = _read_both(path)
    assert meta.format == "png"
    assert meta.taken_source == "mtime"
    assert meta.taken_at == _mtime_clock(MTIME)
    assert (meta.make, meta.model, meta.camera, meta.lens) == (None, None, None, None)
    assert (meta.lat, meta.lon, meta.alt, meta.place) == (None, None, None, None)
    assert meta.problems == ()
    assert (decoded.width, decoded.height) == SIZE


def test_png_with_exif(tmp_path):
    path = tmp_path / "tagged.png"
    exif = _exif(GOOD_BASE, GOOD_EXIF, GOOD_GPS)
    Image.new("RGB", SIZE, (0, 90, 200)).save(path, exif=exif)
    meta, _ = _read_both(path)
    assert meta.format == "png"
    assert meta.taken_source == "DateTimeOriginal"
    assert meta.camera == "Canon EOS R5"
    assert meta.lat == pytest.approx(38.7223, abs=1e-6)


def test_decode_without_meta_reads_none(tmp_path):
    decoded = decode_file(str(_photo(tmp_path / "a.jpg")), min_side=32)
    assert decoded.meta is None and decoded.image is not None


def test_iso_time():
    noon = clock_seconds(dt.datetime(2024, 6, 1, 12, 0))
    assert iso_time(noon, None) == "2024-06-01T12:00:00"
    assert iso_time(noon, 0) == "2024-06-01T12:00:00+00:00"
    assert iso_time(noon, 345) == "2024-06-01T12:00:00+05:45"
    assert iso_time(noon, -210) == "2024-06-01T12:00:00-03:30"
    assert iso_time(None, 60) is None
    assert iso_time(clock_seconds(dt.datetime(1969, 12, 31, 23, 0)), None) == \
        "1969-12-31T23:00:00"


# --- 2. camera names ---------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "model", "camera"), [
    ("Canon", "Canon EOS R5", "Canon EOS R5"),
    ("NIKON CORPORATION", "NIKON D750", "Nikon D750"),
    ("SONY", "ILCE-7M3", "Sony ILCE-7M3"),
    ("Apple", "iPhone 13", "Apple iPhone 13"),
    ("FUJIFILM", "X-T4", "Fujifilm X-T4"),
    ("OLYMPUS IMAGING CORP.", "E-M5", "Olympus E-M5"),
    ("LEICA CAMERA AG", "LEICA Q2", "Leica Q2"),
    ("HMD Global", "Nokia 8.3 5G", "Nokia 8.3 5G"),
    ("NIKON CORPORATION", "NIKON", "Nikon"),
    ("ACME OPTICS", "Z1", "Acme Optics Z1"),
    (None, "iPhone 13", "iPhone 13"),
    ("", "ILCE-7M3", "ILCE-7M3"),
    ("NIKON CORPORATION", None, "Nikon"),
    ("Canon", "", "Canon"),
    (None, None, None),
])
def test_camera_name(make, model, camera):
    assert camera_name(make, model) == camera


@pytest.mark.parametrize(("make", "maker"), [
    ("NIKON CORPORATION", "Nikon"), ("FUJIFILM", "Fujifilm"), ("SONY", "Sony"),
    ("OLYMPUS IMAGING CORP.", "Olympus"), ("  Canon  ", "Canon"), ("Apple", "Apple"),
    ("SAMSUNG TECHWIN", "Samsung"), ("EASTMAN KODAK COMPANY", "Kodak"),
])
def test_maker_name(make, maker):
    assert maker_name(make) == maker


@pytest.mark.parametrize(("make", "model", "want"), [
    ("NIKON CORPORATION", "NIKON D750", ("Nikon", "NIKON D750", "Nikon D750")),
    ("FUJIFILM", "X-T4", ("Fujifilm", "X-T4", "Fujifilm X-T4")),
    # padded the way cameras pad them: trailing spaces, NULs and junk after the first NUL
    (b"NIKON CORPORATION\x00\x00\x00junk", "NIKON D750      ",
     ("Nikon", "NIKON D750", "Nikon D750")),
    ("  OLYMPUS IMAGING CORP.  ", b"E-M5\x00\x00\x00\x00", ("Olympus", "E-M5", "Olympus E-M5")),
    ("Canon\x07", "Canon  EOS R5 ", ("Canon", "Canon EOS R5", "Canon EOS R5")),
])
def test_camera_read_from_the_file(tmp_path, make, model, want):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", base={MAKE: make, MODEL: model}))
    assert (meta.make, meta.model, meta.camera) == want
    assert meta.problems == ()


def test_tab_inside_a_name_is_a_space(tmp_path):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", base={MODEL: "Canon EOS\tR5"}))
    assert meta.model == "Canon EOS R5"


def test_model_only_and_make_only_in_the_file(tmp_path):
    model_only, _ = _read_both(_photo(tmp_path / "m.jpg", base={MAKE: None, MODEL: "X-T4"}))
    assert (model_only.make, model_only.model, model_only.camera) == (None, "X-T4", "X-T4")
    make_only, _ = _read_both(_photo(tmp_path / "k.jpg", base={MAKE: "SONY", MODEL: None}))
    assert (make_only.make, make_only.model, make_only.camera) == ("Sony", None, "Sony")
    neither, _ = _read_both(_photo(tmp_path / "n.jpg", base={MAKE: None, MODEL: None}))
    assert (neither.make, neither.model, neither.camera) == (None, None, None)
    assert model_only.problems == make_only.problems == neither.problems == ()


# --- 3. GPS ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lat_ref", "lon_ref", "lat", "lon"), [
    ("N", "E", 38.7223, 9.1393), ("N", "W", 38.7223, -9.1393),
    ("S", "E", -38.7223, 9.1393), ("S", "W", -38.7223, -9.1393),
    (b"S\x00", b"W\x00", -38.7223, -9.1393), ("s", "w", -38.7223, -9.1393),
])
def test_gps_hemispheres(tmp_path, lat_ref, lon_ref, lat, lon):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps={1: lat_ref, 3: lon_ref}))
    assert meta.lat == pytest.approx(lat, abs=1e-6)
    assert meta.lon == pytest.approx(lon, abs=1e-6)
    assert meta.problems == ()


def test_gps_degrees_minutes_seconds(tmp_path):
    gps = {1: "S", 2: (R(33, 1), R(52, 1), R(776, 100)),  # Sydney: 33°52'7.76"
           3: "E", 4: (R(151, 1), R(12, 1), R(3348, 100)),  # 151°12'33.48"
           5: b"\x00", 6: R(585, 10)}
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps=gps))
    assert abs(meta.lat - -(33 + 52 / 60 + 7.76 / 3600)) < 1e-6
    assert abs(meta.lon - (151 + 12 / 60 + 33.48 / 3600)) < 1e-6
    assert meta.alt == pytest.approx(58.5)


def test_gps_decimal_minutes(tmp_path):
    # degrees and decimal minutes, no seconds (what some phones write)
    gps = {2: (R(48, 1), R(513396, 10000), R(0, 1)), 4: (R(2, 1), R(211320, 10000), R(0, 1)),
           1: "N", 3: "E"}
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps=gps))
    assert abs(meta.lat - (48 + 51.3396 / 60)) < 1e-6
    assert abs(meta.lon - (2 + 21.132 / 60)) < 1e-6


@pytest.mark.parametrize("ref", [1, b"\x01"])
def test_altitude_below_sea_level(tmp_path, ref):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps={5: ref, 6: R(4305, 10)}))
    assert meta.alt == pytest.approx(-430.5)  # the Dead Sea shore
    _assert_good(meta, but=("alt",))


def test_altitude_without_ref_is_above_sea_level(tmp_path):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps={5: None, 6: R(8848, 1)}))
    assert meta.alt == 8848.0


def test_no_gps_at_all(tmp_path):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps={k: None for k in GOOD_GPS}))
    assert (meta.lat, meta.lon, meta.alt) == (None, None, None)
    assert meta.problems == ()
    _assert_good(meta, but=("lat", "lon", "alt"))


# --- 4. hostile metadata: the field is empty and counted, the image still comes back ----------
@pytest.mark.parametrize("date", [
    "0000:00:00 00:00:00", "    :  :     :  :  ", "2021:13:01 00:00:00", "2021:02:30 10:00:00",
    "garbage", "1700:01:01 00:00:00", "2021:06:01 25:00:00", "2021:06:01", "",
])
def test_unusable_date(tmp_path, date):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", exif_ifd={ORIGINAL: date}))
    # the EXIF date is not used: the capture time is the file's, and says so
    assert meta.taken_source == "mtime"
    assert meta.taken_at == _mtime_clock(MTIME)
    assert meta.taken_at != GOOD["taken_at"]
    if date:  # an empty string is no date at all rather than a bad one
        assert "taken_at" in meta.problems
    assert set(meta.problems) <= {"taken_at"}
    _assert_good(meta, but=("taken_at", "taken_offset", "taken_source"))


def test_unusable_original_falls_back_to_digitized(tmp_path):
    path = _photo(tmp_path / "a.jpg", exif_ifd={ORIGINAL: "0000:00:00 00:00:00",
                                                 DIGITIZED: "2021:06:01 14:03:07"})
    meta, _ = _read_both(path)
    assert meta.taken_source == "DateTimeDigitized"
    assert meta.taken_at == GOOD["taken_at"] + 7
    assert meta.problems == ("taken_at",)


@pytest.mark.parametrize("date", ["2021:06:01 14:03:00\x00\x00", "2021-06-01T14:03:00",
                                  "2021:06:01 14:03:00.123", " 2021:06:01 14:03:00 "])
def test_tolerated_date_spellings(tmp_path, date):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", exif_ifd={ORIGINAL: date}))
    _assert_good(meta)
    assert meta.problems == ()


@pytest.mark.parametrize("offset", ["+25:00", "1:00", "+05:75", "+15:00", "Z", "garbage"])
def test_unusable_offset(tmp_path, offset):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", exif_ifd={OFFSET_ORIGINAL: offset}))
    assert meta.taken_offset is None
    assert meta.problems == ("taken_offset",)
    _assert_good(meta, but=("taken_offset",))  # the clock time itself stands
    assert iso_time(meta.taken_at, meta.taken_offset) == "2021-06-01T14:03:00"


@pytest.mark.parametrize("offset", ["+14:00", "-12:00", "+0545", "-09:30"])
def test_extreme_but_real_offsets(tmp_path, offset):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", exif_ifd={OFFSET_ORIGINAL: offset}))
    sign = -1 if offset[0] == "-" else 1
    digits = offset[1:].replace(":", "")
    assert meta.taken_offset == sign * (int(digits[:2]) * 60 + int(digits[2:]))
    assert meta.problems == ()


@pytest.mark.parametrize("gps", [
    pytest.param({2: (R(95, 1), R(0, 1), R(0, 1))}, id="latitude-95"),
    pytest.param({4: (R(181, 1), R(0, 1), R(0, 1))}, id="longitude-181"),
    pytest.param({2: (R(1, 0), R(0, 1), R(0, 1))}, id="zero-denominator-degrees"),
    pytest.param({4: (R(9, 1), R(8, 0), R(0, 1))}, id="zero-denominator-minutes"),
    pytest.param({1: "X"}, id="ref-X"),
    pytest.param({3: "N"}, id="longitude-ref-N"),
    pytest.param({2: (R(0, 1), R(0, 1), R(0, 1)), 4: (R(0, 1), R(0, 1), R(0, 1))},
                 id="null-island"),
    pytest.param({4: None}, id="latitude-without-longitude"),
])
def test_impossible_gps(tmp_path, gps):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps=gps))
    assert (meta.lat, meta.lon) == (None, None)
    assert meta.problems == ("gps",)
    _assert_good(meta, but=("lat", "lon", "alt"))


@pytest.mark.parametrize("lat", [math.nan, math.inf])
def test_non_finite_gps_latitude(tmp_path, lat):
    """A latitude stored as DOUBLEs (TIFF type 12) NaN / infinite: Pillow cannot write one, so
    the block is built by hand; the same block with a finite value shows it is read at all."""
    def photo(name: str, degrees: float) -> Path:
        payload = _raw_exif(
            [(MAKE, 2, 6, b"Canon\x00")],
            [(1, 2, 2, b"N\x00"), (2, 12, 3, struct.pack(">3d", degrees, 0.0, 0.0)),
             (3, 2, 2, b"W\x00"), (4, 5, 3, _rationals((9, 1), (8, 1), (2148, 100)))])
        path = tmp_path / name
        Image.new("RGB", SIZE).save(path, exif=payload)
        return path

    finite, _ = _read_both(photo("finite.jpg", 38.5))
    assert finite.lat == 38.5 and finite.make == "Canon" and finite.problems == ()
    meta, _ = _read_both(photo("bad.jpg", lat))
    assert (meta.lat, meta.lon) == (None, None)
    assert meta.problems == ("gps",)
    assert meta.make == "Canon"


@pytest.mark.parametrize("alt", [R(42, 0), R(10**9, 1)], ids=["zero-denominator", "1e9-m"])
def test_unusable_altitude_keeps_the_position(tmp_path, alt):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", gps={6: alt}))
    assert meta.alt is None
    assert meta.problems == ("altitude",)
    _assert_good(meta, but=("alt",))


def test_non_utf8_make(tmp_path):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", base={MAKE: b"Cam\xe9ra"}))
    assert meta.make is None
    assert meta.camera == "Canon EOS R5"  # the model alone
    assert meta.problems == ("camera",)
    _assert_good(meta, but=("make",))


def test_utf8_make_comes_back(tmp_path):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", base={MAKE: "Câmera".encode()}))
    assert meta.make == "Câmera"
    assert meta.camera == "Câmera Canon EOS R5"
    assert meta.problems == ()


def test_utf8_written_through_pillows_text_writer(tmp_path):
    # a str of the UTF-8 bytes read as latin-1: Pillow's ASCII writer then writes those bytes
    # (or, where it refuses non-ASCII, replaces them: either way no traceback, no mojibake)
    text = "Câmera".encode().decode("latin-1")
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", base={MAKE: text}))
    assert meta.make in ("Câmera", "C??mera")
    assert "Ã" not in (meta.make or "")


def test_non_utf8_lens_and_model(tmp_path):
    path = _photo(tmp_path / "a.jpg", base={MODEL: b"\xff\xfe\x00"},
                  exif_ifd={LENS_MODEL: b"Objectif \xe0 main"})
    meta, _ = _read_both(path)
    assert (meta.model, meta.lens) == (None, None)
    assert meta.camera == "Canon"
    assert set(meta.problems) == {"camera", "lens"}
    _assert_good(meta, but=("model", "camera", "lens"))


def test_overlong_model_is_not_a_name(tmp_path):
    meta, _ = _read_both(_photo(tmp_path / "a.jpg", base={MODEL: "X" * 300}))
    assert meta.model is None
    assert meta.camera == "Canon"
    assert meta.problems == ("camera",)


def test_60_kb_maker_note(tmp_path):
    note = bytes(range(256)) * 240  # 61,440 bytes of opaque maker data
    path = _photo(tmp_path / "a.jpg", exif_ifd={MAKER_NOTE: note})
    start, end = _app1(path.read_bytes())
    assert end - start > 60_000  # the note really is in the file
    meta, _ = _read_both(path)
    _assert_good(meta)
    assert meta.problems == ()


def test_orientation_9(tmp_path):
    meta, decoded = _read_both(_photo(tmp_path / "a.jpg", base={ORIENTATION: 9}))
    assert meta.problems == ("orientation",)
    _assert_good(meta)
    assert (decoded.width, decoded.height) == SIZE  # used as stored
    assert decoded.image.size == SIZE


def test_orientation_6_turns_the_image_and_is_no_problem(tmp_path):
    meta, decoded = _read_both(_photo(tmp_path / "a.jpg", base={ORIENTATION: 6}))
    assert meta.problems == ()
    assert (decoded.width, decoded.height) == (SIZE[1], SIZE[0])
    assert decoded.image.size == (SIZE[1], SIZE[0])


def _broken_header(tmp_path: Path, **save) -> Path:
    """A JPEG whose Exif block is not TIFF ('XX' for its byte order): Pillow refuses it."""
    data = _photo(tmp_path / "good.jpg", **save).read_bytes()
    start, end = _app1(data)
    payload = data[start:end]
    broken = payload[:6] + b"XX" + payload[8:]
    with pytest.raises(SyntaxError):
        Image.Exif().load(broken)
    path = tmp_path / "broken.jpg"
    path.write_bytes(_with_app1(data, broken))
    return path


def _assert_nothing_from_exif(meta) -> None:
    assert meta.taken_source == "mtime"
    assert (meta.make, meta.model, meta.camera, meta.lens) == (None, None, None, None)
    assert (meta.lat, meta.lon, meta.alt) == (None, None, None)
    assert meta.format == "jpeg"


def test_exif_block_that_is_not_tiff_is_counted(tmp_path):
    # with a JFIF density Pillow does not read the Exif block while opening the file
    meta, decoded = _read_both(_broken_header(tmp_path, dpi=(300, 300)))
    _assert_nothing_from_exif(meta)
    assert meta.problems == ("exif",)
    assert (decoded.width, decoded.height) == SIZE



def _cut_in_exif_ifd(data: bytes) -> bytes:
    """The Exif APP1 payload cut right after the Exif IFD's entry count (IFD0 intact)."""
    start, end = _app1(data)
    payload = data[start:end]
    with Image.open(io.BytesIO(data)) as im:
        exif_ifd = im.getexif()[EXIF_IFD]
    return payload[:6 + exif_ifd + 2]


def _exif_pointer_past_end(data: bytes) -> bytes:
    """The Exif APP1 payload with the Exif IFD pointer (in IFD0) far past the block's end."""
    start, end = _app1(data)
    payload = bytearray(data[start:end])
    entry = payload.index(b"\x87\x69\x00\x04\x00\x00\x00\x01")  # tag 0x8769, LONG, count 1
    payload[entry + 8:entry + 12] = struct.pack(">I", 0x00FFFF00)
    return bytes(payload)


@pytest.mark.parametrize("damage", [
    pytest.param("cut", id="truncated-inside-exif-ifd"),
    pytest.param("pointer", id="exif-ifd-pointer-past-end"),
])
def test_truncated_exif_block_still_decodes(tmp_path, damage):
    data = _photo(tmp_path / "good.jpg").read_bytes()
    payload = _cut_in_exif_ifd(data) if damage == "cut" else _exif_pointer_past_end(data)
    path = tmp_path / "broken.jpg"
    path.write_bytes(_with_app1(data, payload))
    with warnings.catch_warnings(record=True) as caught:  # really broken: Pillow says so
        warnings.simplefilter("always")
        with Image.open(path) as im:
            assert im.getexif().get_ifd(EXIF_IFD) == {}
    assert any("EXIF" in str(w.message) or "Truncated" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta, decoded = _read_both(path)
    assert (decoded.width, decoded.height) == SIZE
    # IFD0 was whole: the camera survives; the Exif IFD's date and lens are gone
    assert meta.camera == "Canon EOS R5"
    assert meta.lens is None
    assert meta.taken_source == "mtime"


@pytest.mark.parametrize("case", [
    pytest.param("header-no-dpi", id="not-tiff-without-jfif-density"),
    pytest.param("cut", id="truncated-inside-exif-ifd"),
    pytest.param("pointer", id="exif-ifd-pointer-past-end"),
])
def test_broken_exif_block_is_counted(tmp_path, case):
    """A broken or truncated EXIF block is named in `problems` (Pillow itself only warns, or
    swallows the error while opening a JPEG)."""
    if case == "header-no-dpi":
        path = _broken_header(tmp_path)
    else:
        data = _photo(tmp_path / "good.jpg").read_bytes()
        payload = _cut_in_exif_ifd(data) if case == "cut" else _exif_pointer_past_end(data)
        path = tmp_path / "broken.jpg"
        path.write_bytes(_with_app1(data, payload))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta, decoded = _read_both(path)
    assert decoded.image is not None
    assert "exif" in meta.problems


def test_every_problem_at_once(tmp_path):
    path = _photo(tmp_path / "a.jpg",
                  base={MAKE: b"\xe9\xe9", ORIENTATION: 9},
                  exif_ifd={ORIGINAL: "0000:00:00 00:00:00", OFFSET_ORIGINAL: "+25:00",
                            LENS_MODEL: b"\xff", MAKER_NOTE: b"\x00" * 60_000},
                  gps={2: (R(95, 1), R(0, 1), R(0, 1))})
    meta, decoded = _read_both(path)
    assert (decoded.width, decoded.height) == SIZE
    assert set(meta.problems) == {"orientation", "taken_at", "camera", "lens", "gps"}
    assert len(meta.problems) == len(set(meta.problems))  # each named once
    assert (meta.make, meta.lens, meta.lat, meta.lon) == (None, None, None, None)
    assert meta.model == "Canon EOS R5"
    assert meta.taken_source == "mtime"


# --- 5. places ---------------------------------------------------------------------------------
def test_places_for():
    lisbon, tokyo, sea, paris, sao_paulo = places_for(
        [(38.7223, -9.1393), (35.6762, 139.6503), (0.0, -30.0), (48.8566, 2.3522),
         (-23.5505, -46.6333)])
    assert (lisbon.city, lisbon.country, lisbon.country_code) == ("Lisbon", "Portugal", "PT")
    assert tokyo.city == "Tokyo" and tokyo.country_code == "JP"
    assert sea is None
    assert isinstance(paris, Place)
    assert (paris.city, paris.region, paris.country) == ("Paris", "Île-de-France", "France")
    assert sao_paulo.city == "São Paulo" and sao_paulo.country_code == "BR"
    assert places_for([]) == []


# --- 6. folding --------------------------------------------------------------------------------
def test_fold():
    assert fold("São Paulo") == fold("sao paulo") == fold("SAO PAULO") == "sao paulo"
    assert fold("Île-de-France") == "ile-de-france"
    assert fold("Reykjavík") == fold("reykjavik")
    assert fold("Straße") == fold("STRASSE")
    assert fold("Lisbon") != fold("Lisboa")


# --- 7. the scenes generator ---------------------------------------------------------------------
def test_scenes_carry_the_metadata_scene_meta_says(tmp_path):
    write_scenes(tmp_path, 21, size=64)
    kinds: dict[str, int] = {"png": 0, "no-exif": 0, "no-gps": 0, "gps": 0}
    gps_cities: list[tuple[float, float, str]] = []
    for number in range(21):
        suffix = "png" if number % 3 == 2 else "jpg"
        path = tmp_path / f"scene_{number:05d}.{suffix}"
        st = os.stat(path)
        meta = read_file_meta(str(path), st.st_mtime_ns)
        want = scene_meta(number)
        assert meta.problems == (), path.name
        if suffix == "png" or want is None:
            kinds["png" if suffix == "png" else "no-exif"] += 1
            assert want is None
            assert meta.format == suffix.replace("jpg", "jpeg")
            assert meta.taken_source == "mtime"
            assert meta.taken_at == pytest.approx(_mtime_clock(st.st_mtime_ns / 1e9), abs=1e-3)
            assert meta.camera is None and meta.lat is None
            continue
        assert meta.format == "jpeg"
        assert meta.taken_source == "DateTimeOriginal"
        assert meta.taken_at == clock_seconds(want.taken)
        if want.offset:
            sign = -1 if want.offset[0] == "-" else 1
            hours, minutes = want.offset[1:].split(":")
            assert meta.taken_offset == sign * (int(hours) * 60 + int(minutes))
        else:
            assert meta.taken_offset is None
        assert meta.camera == camera_name(want.make, want.model)
        assert meta.make == maker_name(want.make)
        assert meta.model == want.model and meta.lens == want.lens
        if want.lat is None:
            kinds["no-gps"] += 1
            assert (meta.lat, meta.lon, meta.alt) == (None, None, None)
        else:
            kinds["gps"] += 1
            assert meta.lat == pytest.approx(want.lat, abs=1e-5)
            assert meta.lon == pytest.approx(want.lon, abs=1e-5)
            assert meta.alt == 42.0
            gps_cities.append((meta.lat, meta.lon, want.city))
    assert all(kinds.values()), kinds  # every kind of scene file was checked
    places = places_for([(lat, lon) for lat, lon, _ in gps_cities])
    assert [p.city if p else None for p in places] == [city for _, _, city in gps_cities]
