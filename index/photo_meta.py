"""Photo metadata: when, where and with which camera, read from EXIF with Pillow (no exiftool).

What is read, per image:
- capture time: DateTimeOriginal (with OffsetTimeOriginal when present), else DateTimeDigitized
  (with OffsetTimeDigitized), else the file's mtime in this machine's time zone; which one is
  kept in `taken_source`. Times are the photo's *local clock time* (what the camera showed),
  stored as seconds since 1970-01-01 00:00 of that clock (`taken_at`), with the UTC offset in
  minutes when it is known (`taken_offset`). Filters and the date sort compare clock times:
  "photos of June 1st" means June 1st where they were taken.
- camera make and model, normalised ("Canon EOS R5", "Nikon D750", "Apple iPhone 13"), lens;
- GPS latitude, longitude, altitude; the place (country, region, city) is found offline by
  `places_for` from GeoNames' cities (the `reverse-geocode` package, which ships them);
- the format ("jpeg", "png", "heic", ...). Width, height (upright) and bytes are the image
  row's own.

Hostile metadata never stops a run: a value that cannot be used ("0000:00:00 00:00:00", a GPS
latitude of 95°, a rational with a zero denominator, a non-UTF-8 camera name, an orientation
of 9, a truncated EXIF block) leaves its field empty and is named in `problems`, which the
index report counts.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

__all__ = ["META_VERSION", "PhotoMeta", "Place", "camera_name", "fold", "meta_from_exif",
           "places_for", "read_file_meta"]

# Bump when extraction changes: rows written by an older version are read again by the next
# `clipdex index` (their files are opened for the header only; nothing is re-embedded).
META_VERSION = 1

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL, ORIENTATION = 0x010F, 0x0110, 0x0112
DATETIME_ORIGINAL, DATETIME_DIGITIZED = 0x9003, 0x9004
OFFSET_ORIGINAL, OFFSET_DIGITIZED = 0x9011, 0x9012
LENS_MAKE, LENS_MODEL = 0xA433, 0xA434
MAX_TEXT = 128  # make, model, lens: longer is not a name

# Places: GeoNames lists places of ≥ 1000 people, quarters of large cities among them. The
# nearest place names the region and country when it lies within REGION_KM (further is the
# open sea or a wilderness). The city is, of the nearest place of each size tier
# (CITY_TIERS: any, ≥ 15k, ≥ 100k, ≥ 1M people) within CITY_KM, the one with the most people per
# (km + 1)²: a point in central Lisbon is "Lisbon", not its quarter "São Jorge de Arroios";
# central Tokyo is Tokyo, not the ward Nakano.
REGION_KM = 150.0
CITY_KM = 25.0
CITY_TIERS = (0, 15_000, 100_000, 1_000_000)

FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
           "BMP": "bmp", "TIFF": "tiff", "HEIF": "heic", "AVIF": "avif"}

# Makers as they write themselves in EXIF, and as people name them
_MAKERS = {
    "canon": "Canon", "nikon": "Nikon", "nikon corporation": "Nikon", "sony": "Sony",
    "fujifilm": "Fujifilm", "fuji photo film co., ltd.": "Fujifilm",
    "olympus": "Olympus", "olympus imaging corp.": "Olympus", "olympus corporation": "Olympus",
    "olympus optical co.,ltd": "Olympus", "om digital solutions": "OM System",
    "panasonic": "Panasonic", "samsung": "Samsung", "samsung techwin": "Samsung",
    "apple": "Apple", "google": "Google", "huawei": "Huawei", "xiaomi": "Xiaomi",
    "leica": "Leica", "leica camera ag": "Leica", "ricoh": "Ricoh",
    "ricoh imaging company, ltd.": "Ricoh", "pentax": "Pentax",
    "pentax corporation": "Pentax", "eastman kodak company": "Kodak", "kodak": "Kodak",
    "gopro": "GoPro", "dji": "DJI", "hasselblad": "Hasselblad", "oneplus": "OnePlus",
    "motorola": "Motorola", "lg electronics": "LG", "hmd global": "Nokia", "nokia": "Nokia",
    "sigma": "Sigma", "minolta co., ltd.": "Minolta", "konica minolta": "Konica Minolta",
    "casio computer co.,ltd.": "Casio", "casio": "Casio", "oppo": "OPPO", "vivo": "vivo",
    "zte": "ZTE", "htc": "HTC", "blackberry": "BlackBerry", "microsoft": "Microsoft",
    "parrot": "Parrot", "insta360": "Insta360",
}
_MAKER_SUFFIX = re.compile(
    r"[\s,]+(corporation|corp\.?|co\.?,?\s*ltd\.?|company|inc\.?|imaging|optical|"
    r"electronics|camera ag|ag|gmbh|ltd\.?)$", re.I)
_DATE = re.compile(r"^\s*(\d{4})[:\-/](\d{2})[:\-/](\d{2})[ T](\d{2}):(\d{2}):(\d{2})"
                   r"(?:[.,]\d+)?\s*(?:Z|[+-]\d{2}:?\d{2})?\s*$")
_OFFSET = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")
_EPOCH = dt.datetime(1970, 1, 1)


@dataclass(frozen=True)
class Place:
    country_code: str | None
    country: str | None
    region: str | None
    city: str | None


@dataclass(frozen=True)
class PhotoMeta:
    """What an image's file says about it; None where it says nothing usable."""

    taken_at: float | None = None  # local clock seconds since 1970-01-01 00:00
    taken_offset: int | None = None  # minutes east of UTC, when known
    taken_source: str | None = None  # "DateTimeOriginal" | "DateTimeDigitized" | "mtime"
    make: str | None = None
    model: str | None = None
    camera: str | None = None  # make and model as one name
    lens: str | None = None
    lat: float | None = None
    lon: float | None = None
    alt: float | None = None
    format: str | None = None
    place: Place | None = None
    problems: tuple[str, ...] = field(default=(), compare=False)

    def row(self) -> dict:
        """The columns of the store's `image_meta` row (without the image id)."""
        place = self.place or Place(None, None, None, None)
        return {"version": META_VERSION, "taken_at": self.taken_at,
                "taken_offset": self.taken_offset, "taken_source": self.taken_source,
                "make": self.make, "model": self.model, "camera": self.camera,
                "lens": self.lens, "lat": self.lat, "lon": self.lon, "alt": self.alt,
                "format": self.format, "country_code": place.country_code,
                "country": place.country, "region": place.region, "city": place.city}


def iso_time(taken_at: float | None, offset: int | None) -> str | None:
    """A stored capture time as ISO 8601: "2024-06-01T14:03:00+01:00" (no offset if unknown)."""
    if taken_at is None:
        return None
    clock = _EPOCH + dt.timedelta(seconds=taken_at)
    text = clock.isoformat(timespec="seconds")
    if offset is None:
        return text
    sign = "+" if offset >= 0 else "-"
    return f"{text}{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


def clock_seconds(when: dt.datetime) -> float:
    """A naive (clock) datetime as seconds since 1970-01-01 00:00 of the same clock."""
    return (when - _EPOCH).total_seconds()


# --- reading ---------------------------------------------------------------------------------
def meta_from_exif(exif, *, mtime_ns: int, pillow_format: str | None) -> PhotoMeta:
    """PhotoMeta from a Pillow `Image.Exif` (or None when the file has none or it could not be
    read), the file's mtime (the capture-time fallback) and Pillow's format name."""
    problems: list[str] = []
    base: dict = {}
    exif_ifd: dict = {}
    gps_ifd: dict = {}
    if exif is not None:
        try:
            base = dict(exif)
            exif_ifd = dict(exif.get_ifd(EXIF_IFD))
            gps_ifd = dict(exif.get_ifd(GPS_IFD))
        except Exception:  # a truncated or corrupt block: whatever was read is used
            problems.append("exif")
    orientation = base.get(ORIENTATION)
    if orientation is not None and orientation not in range(1, 9):
        problems.append("orientation")
    taken_at, offset, source = _capture_time(exif_ifd, mtime_ns, problems)
    make = _text(base.get(MAKE), "camera", problems)
    model = _text(base.get(MODEL), "camera", problems)
    lens = _text(exif_ifd.get(LENS_MODEL), "lens", problems)
    lat, lon, alt = _gps(gps_ifd, problems)
    make_name = maker_name(make) if make else None
    return PhotoMeta(
        taken_at=taken_at, taken_offset=offset, taken_source=source, make=make_name,
        model=model, camera=camera_name(make, model), lens=lens, lat=lat, lon=lon, alt=alt,
        format=FORMATS.get(pillow_format or "", (pillow_format or "").lower() or None),
        problems=tuple(dict.fromkeys(problems)))


_WARNINGS_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide state


def read_exif(im):
    """(the image's Exif or None, whether its EXIF block is broken) — never an exception.

    Pillow reads a damaged block quietly: its JPEG opener parses EXIF for the resolution and
    swallows the error, and a truncated block only warns. So the raw block, when the file has
    one, is parsed afresh here with its warnings recorded: a warning, an error or a block that
    yields nothing counts as broken (whatever could be read is still used).
    """
    raw = im.info.get("exif")
    if isinstance(raw, (bytes, bytearray)) and len(raw) > 8:
        import warnings

        from PIL import Image

        exif = Image.Exif()
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exif.load(bytes(raw))
                exif.get_ifd(EXIF_IFD)
                exif.get_ifd(GPS_IFD)
            except Exception:
                return None, True
        return exif, bool(caught) or len(exif) == 0
    try:
        return im.getexif(), False
    except Exception:
        return None, True


def read_file_meta(path: str, mtime_ns: int) -> PhotoMeta:
    """Metadata of an indexed file without decoding its pixels (an existing library's images
    gain their metadata this way). Raises OSError when the file cannot be opened at all."""
    from PIL import Image, UnidentifiedImageError

    from .scan import register_heif

    register_heif()
    try:
        with Image.open(path) as im:
            exif, failed = read_exif(im)
            meta = meta_from_exif(exif, mtime_ns=mtime_ns, pillow_format=im.format)
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError) as exc:
        raise OSError(f"cannot read the header: {exc}") from None
    return replace(meta, problems=meta.problems + ("exif",)) if failed else meta


def _capture_time(exif_ifd: dict, mtime_ns: int,
                  problems: list[str]) -> tuple[float | None, int | None, str | None]:
    for tag, offset_tag, source in ((DATETIME_ORIGINAL, OFFSET_ORIGINAL, "DateTimeOriginal"),
                                    (DATETIME_DIGITIZED, OFFSET_DIGITIZED, "DateTimeDigitized")):
        raw = exif_ifd.get(tag)
        if raw is None:
            continue
        when = _parse_exif_date(raw)
        if when is None:
            problems.append("taken_at")
            continue
        offset = _parse_offset(exif_ifd.get(offset_tag))
        if exif_ifd.get(offset_tag) is not None and offset is None:
            problems.append("taken_offset")
        return clock_seconds(when), offset, source
    try:
        local = dt.datetime.fromtimestamp(mtime_ns / 1e9).astimezone()
    except (OverflowError, OSError, ValueError):
        return None, None, None
    utcoffset = local.utcoffset()
    minutes = int(utcoffset.total_seconds() // 60) if utcoffset is not None else None
    return clock_seconds(local.replace(tzinfo=None)), minutes, "mtime"


def _parse_exif_date(raw) -> dt.datetime | None:
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if not isinstance(raw, str):
        return None
    m = _DATE.match(raw.replace("\x00", ""))
    if not m:
        return None
    year, month, day, hour, minute, second = map(int, m.groups())
    if not 1800 <= year <= 2200:
        return None
    try:
        return dt.datetime(year, month, day, hour, minute, min(second, 59))
    except ValueError:  # month 13, February 30th, hour 25
        return None


def _parse_offset(raw) -> int | None:
    if not isinstance(raw, str):
        return None
    m = _OFFSET.match(raw.replace("\x00", ""))
    if not m:
        return None
    minutes = int(m[2]) * 60 + int(m[3])
    if int(m[3]) >= 60 or minutes > 14 * 60:
        return None
    return minutes if m[1] == "+" else -minutes


def _text(raw, name: str, problems: list[str]) -> str | None:
    """An EXIF text as clean Unicode: Pillow reads EXIF strings as latin-1, so the bytes are
    recovered and must be UTF-8 (plain ASCII is); control characters and padding go."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = raw.encode("latin-1")
        except UnicodeEncodeError:  # already real Unicode (e.g. from pillow-heif)
            raw = raw.encode("utf-8")
    if not isinstance(raw, bytes):
        problems.append(name)
        return None
    try:
        text = raw.split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        problems.append(name)
        return None
    text = " ".join("".join(" " if unicodedata.category(ch)[0] == "C" else ch
                            for ch in text).split())
    if len(text) > MAX_TEXT:
        problems.append(name)
        return None
    return text or None


def maker_name(make: str) -> str:
    """A camera maker as people name it: "NIKON CORPORATION" → "Nikon"."""
    key = make.strip().lower()
    if key in _MAKERS:
        return _MAKERS[key]
    stripped = _MAKER_SUFFIX.sub("", make.strip()).strip(" ,.")
    if stripped.lower() in _MAKERS:
        return _MAKERS[stripped.lower()]
    stripped = stripped or make.strip()
    return stripped.title() if stripped.isupper() and len(stripped) > 3 else stripped


def camera_name(make: str | None, model: str | None) -> str | None:
    """Make and model as one name, the maker said once: ("Canon", "Canon EOS R5") →
    "Canon EOS R5"; ("NIKON CORPORATION", "NIKON D750") → "Nikon D750"."""
    maker = maker_name(make) if make else None
    if not model:
        return maker
    if not maker:
        return model
    rest = model
    for prefix in {maker, make or "", (make or "").split(" ")[0]}:
        if prefix and rest.lower().startswith(prefix.lower() + " "):
            rest = rest[len(prefix):].strip()
            break
        if prefix and rest.lower() == prefix.lower():
            return maker
    return f"{maker} {rest}"


def _gps(gps: dict, problems: list[str]) -> tuple[float | None, float | None, float | None]:
    if not gps or (2 not in gps and 4 not in gps):
        return None, None, None
    lat = _degrees(gps.get(2), gps.get(1), "NS")
    lon = _degrees(gps.get(4), gps.get(3), "EW")
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180 or (lat == 0 and lon == 0):
        problems.append("gps")  # (0, 0) is what broken devices write, not a photo at sea
        return None, None, None
    alt = None
    if 6 in gps:
        alt = _number(gps.get(6))
        if alt is None or abs(alt) > 100_000:
            problems.append("altitude")
            alt = None
        elif gps.get(5) in (1, b"\x01"):
            alt = -alt
    return round(lat, 7), round(lon, 7), alt


def _degrees(value, ref, refs: str) -> float | None:
    try:
        parts = [float(v) for v in (value if isinstance(value, (tuple, list)) else (value,))]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        return None
    degrees = sum(p / 60 ** i for i, p in enumerate(parts))
    if isinstance(ref, bytes):
        ref = ref.decode("latin-1")
    ref = (ref or refs[0]).strip("\x00 ").upper() or refs[0]
    if ref not in refs:
        return None
    return -degrees if ref == refs[1] else degrees


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) else None


# --- places ----------------------------------------------------------------------------------
_GEO_LOCK = threading.Lock()


def places_for(points: Sequence[tuple[float, float]]) -> list[Place | None]:
    """The place of each (lat, lon), offline (None where no place is near enough).

    GeoNames' data (shipped by `reverse-geocode`) loads on the first call: ~1 s per tier.
    """
    if not points:
        return []
    reverse_geocode = _reverse_geocode()
    with _GEO_LOCK:
        tiers = [reverse_geocode.search(points, min_population=p) for p in CITY_TIERS]
    out: list[Place | None] = []
    for i, (lat, lon) in enumerate(points):
        near = tiers[0][i]
        if _km(lat, lon, near["latitude"], near["longitude"]) > REGION_KM:
            out.append(None)
            continue
        best, best_score = None, 0.0
        for tier in tiers:
            candidate = tier[i]
            km = _km(lat, lon, candidate["latitude"], candidate["longitude"])
            score = candidate.get("population", 0) / (km + 1.0) ** 2
            if km <= CITY_KM and (best is None or score > best_score):
                best, best_score = candidate, score
        out.append(Place(near.get("country_code") or None, near.get("country") or None,
                         near.get("state") or None, best["city"] if best else None))
    return out


def _reverse_geocode():
    """The module, imported without its side effect: it raises the csv module's field size
    limit for the whole process, which the caption parser relies on to refuse huge fields."""
    import csv

    limit = csv.field_size_limit()
    try:
        import reverse_geocode
    finally:
        csv.field_size_limit(limit)
    return reverse_geocode


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine, Earth radius 6371 km)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + \
        math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(a)))


def fold(text: str) -> str:
    """Case- and accent-free text for matching: "São Paulo" and "sao paulo" meet."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()

