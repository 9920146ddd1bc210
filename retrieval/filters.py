"""Photo metadata filters (when, where, which camera, which format) and the date sort.

`Filters` is what a query asks (parsed from CLI flags, Python arguments or HTTP fields, with a
UsageProblem that names the accepted form for a bad value); `MetaFrame` holds every image's
filterable metadata as numpy columns, so a filter over a million photos is a few vectorised
comparisons and the vector search then runs over the matching ids only (retrieval.search).

Times are clock times, as the photos' cameras showed them (index.photo_meta): `after` is
inclusive, `before` exclusive, so `--after 2024-06-01 --before 2024-07-01` is June 2024 and
`--before 2024` is everything up to the end of 2023. A photo without a usable EXIF time is
dated by its file's mtime (and so still matches date filters); a photo without a camera,
place or position never matches a filter on it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from index.errors import UsageProblem
from index.photo_meta import clock_seconds, fold, iso_time
from index.store import MetaColumns

__all__ = ["FORMAT_ALIASES", "SORTS", "Filters", "MetaFrame", "parse_near", "parse_when"]

SORTS = ("relevance", "date", "-date")
FORMAT_ALIASES = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png", "webp": "webp", "gif": "gif",
                  "bmp": "bmp", "tiff": "tiff", "tif": "tiff", "heic": "heic", "heif": "heic",
                  "avif": "avif"}
DEFAULT_NEAR_KM = 10.0
EARTH_KM = 6371.0
_WHEN_FORMS = "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]"
_WHEN = re.compile(r"^\s*(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})"
                   r"(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?\s*$")


def parse_when(value: str, flag: str) -> tuple[float, float]:
    """A date or time as the span of clock seconds it names: "2024" → [2024-01-01, 2025-01-01),
    "2024-06-01" → that day, "2024-06-01T14:30" → that minute. UsageProblem otherwise."""
    m = _WHEN.match(value or "")
    if not m:
        extra = ("; times are compared as the camera's clock showed them, so give one without "
                 "a UTC offset" if re.search(r"(Z|[+-]\d\d:?\d\d)\s*$", value or "") else "")
        raise UsageProblem(f"{flag}: {value!r} is not a date: give {_WHEN_FORMS}{extra}")
    year, month, day, hour, minute, second = (int(g) if g else None for g in m.groups())
    try:
        start = dt.datetime(year, month or 1, day or 1, hour or 0, minute or 0, second or 0)
    except ValueError as exc:
        raise UsageProblem(f"{flag}: {value!r} is not a date ({exc})") from None
    if month is None:
        end = start.replace(year=year + 1)
    elif day is None:
        end = start.replace(year=year + month // 12, month=month % 12 + 1)
    elif hour is None:
        end = start + dt.timedelta(days=1)
    elif second is None:
        end = start + dt.timedelta(minutes=1)
    else:
        end = start + dt.timedelta(seconds=1)
    return clock_seconds(start), clock_seconds(end)


def parse_near(value: str, flag: str = "--near") -> tuple[float, float, float]:
    """"LAT,LON" or "LAT,LON,KM" (default radius DEFAULT_NEAR_KM) → (lat, lon, km)."""
    form = (f"{flag}: give LAT,LON or LAT,LON,KM (latitude -90 to 90, longitude -180 to 180, "
            f"a radius in km above 0, default {DEFAULT_NEAR_KM:g}), e.g. {flag} 38.72,-9.14,5")
    parts = [p.strip() for p in (value or "").split(",")]
    if len(parts) not in (2, 3):
        raise UsageProblem(f"{form}; got {value!r}")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise UsageProblem(f"{form}; got {value!r}") from None
    lat, lon = numbers[0], numbers[1]
    km = numbers[2] if len(numbers) == 3 else DEFAULT_NEAR_KM
    if not (all(math.isfinite(n) for n in numbers) and -90 <= lat <= 90 and -180 <= lon <= 180
            and 0 < km <= 20_100):
        raise UsageProblem(f"{form}; got {value!r}")
    return lat, lon, km


def parse_types(values: Iterable[str], flag: str = "--type") -> tuple[str, ...]:
    """Formats from "jpeg", "jpg,png", "HEIC"... (aliases folded: jpg → jpeg, heif → heic)."""
    out: list[str] = []
    for value in values:
        for part in str(value).split(","):
            name = part.strip().lower().lstrip(".")
            if not name:
                continue
            if name not in FORMAT_ALIASES:
                raise UsageProblem(f"{flag}: unknown image type {part.strip()!r}: use "
                                   f"{', '.join(sorted(set(FORMAT_ALIASES.values())))}")
            out.append(FORMAT_ALIASES[name])
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Filters:
    """What a query keeps: capture time in [after, before) (clock seconds), a camera (case-
    and accent-insensitive substring of make and model), a place (country, region or city:
    substring, or a country code), within `near` = (lat, lon, km), of given formats."""

    after: float | None = None
    before: float | None = None
    camera: str | None = None
    place: str | None = None
    near: tuple[float, float, float] | None = None
    types: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # zero-shot tags (`clipdex tag`), all of them, any case

    @classmethod
    def parse(cls, *, after: str | None = None, before: str | None = None,
              year: int | str | None = None, month: str | None = None,
              camera: str | None = None, place: str | None = None, near: str | None = None,
              types: str | Sequence[str] = (), tags: str | Sequence[str] = (),
              names: dict | None = None) -> "Filters":
        """Filters from user-typed values (CLI flags, HTTP fields); `names` maps each option
        to what the caller calls it in errors (default: the CLI flag)."""
        names = {"after": "--after", "before": "--before", "year": "--year",
                 "month": "--month", "near": "--near", "type": "--type", **(names or {})}
        lows: list[float] = []
        highs: list[float] = []
        if after not in (None, ""):
            lows.append(parse_when(str(after), names["after"])[0])
        if before not in (None, ""):
            highs.append(parse_when(str(before), names["before"])[0])
        if year not in (None, ""):
            if not re.fullmatch(r"\s*\d{4}\s*", str(year)):
                raise UsageProblem(f"{names['year']}: give a year such as 2024, not {year!r}")
            low, high = parse_when(str(year).strip(), names["year"])
            lows.append(low)
            highs.append(high)
        if month not in (None, ""):
            if not re.fullmatch(r"\s*\d{4}-\d{1,2}\s*", str(month)):
                raise UsageProblem(f"{names['month']}: give a month as YYYY-MM, e.g. 2024-06, "
                                   f"not {month!r}")
            low, high = parse_when(str(month).strip(), names["month"])
            lows.append(low)
            highs.append(high)
        if lows and highs and max(lows) >= min(highs):
            given = ", ".join(names[k] for k, v in (("after", after), ("before", before),
                                                    ("year", year), ("month", month))
                              if v not in (None, ""))
            raise UsageProblem(f"{given}: these dates leave no time between them (after is "
                               f"inclusive, before exclusive)")
        types = [types] if isinstance(types, str) else list(types or ())
        tags = [tags] if isinstance(tags, str) else list(tags or ())
        return cls(after=max(lows) if lows else None, before=min(highs) if highs else None,
                   camera=_clean(camera), place=_clean(place),
                   near=parse_near(near, names["near"]) if near not in (None, "") else None,
                   types=parse_types(types, names["type"]),
                   tags=tuple(dict.fromkeys(t.lower() for t in map(_clean, tags) if t)))

    @property
    def active(self) -> bool:
        return any(v not in (None, ()) for v in (self.after, self.before, self.camera,
                                                  self.place, self.near, self.types,
                                                  self.tags))

    def as_dict(self) -> dict:
        return {"after": iso_time(self.after, None), "before": iso_time(self.before, None),
                "camera": self.camera, "place": self.place,
                "near": list(self.near) if self.near else None, "type": list(self.types),
                "tag": list(self.tags)}


def _clean(text: str | None) -> str | None:
    text = " ".join((text or "").split())
    return text or None


class MetaFrame:
    """Every image's filterable metadata as numpy columns (row i: image ids[i])."""

    def __init__(self, columns: MetaColumns, tags: dict[str, np.ndarray] | None = None) -> None:
        self.tags = tags or {}  # label (lower case) -> ascending ids
        self.ids = np.asarray(columns.ids, np.int64)
        self.taken = _floats(columns.taken_at)
        self.lat = _floats(columns.lat)
        self.lon = _floats(columns.lon)
        self.cameras, self.camera_codes = _codes(columns.camera)
        self.formats, self.format_codes = _codes(columns.format)
        places = [None if c is None and r is None and ci is None else (ci, r, c, cc)
                  for ci, r, c, cc in zip(columns.city, columns.region, columns.country,
                                          columns.country_code)]
        self.places, self.place_codes = _codes(places)
        self.has_meta = bool(np.isfinite(self.taken).any() or len(self.cameras)
                             or len(self.formats))
        # rows by latitude (NaN last): a --near band is two binary searches, not a scan
        self._by_lat = np.argsort(self.lat, kind="stable")
        self._lats = self.lat[self._by_lat]

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, filters: Filters) -> np.ndarray:
        """Which rows pass every filter."""
        keep = np.ones(len(self.ids), bool)
        if filters.after is not None:
            keep &= self.taken >= filters.after  # NaN (no time) compares False
        if filters.before is not None:
            keep &= self.taken < filters.before
        if filters.camera:
            wanted = fold(filters.camera)
            keep &= _any_code(self.camera_codes, [i for i, name in enumerate(self.cameras)
                                                  if wanted in fold(name)])
        if filters.place:
            keep &= _any_code(self.place_codes, [i for i, place in enumerate(self.places)
                                                 if _place_matches(place, filters.place)])
        if filters.types:
            keep &= _any_code(self.format_codes, [i for i, name in enumerate(self.formats)
                                                  if name in filters.types])
        for tag in filters.tags:
            keep &= np.isin(self.ids, self.tags.get(tag, np.empty(0, np.int64)),
                            assume_unique=True)
        if filters.near:
            keep &= self._within(*filters.near, keep)
        return keep

    def select(self, filters: Filters) -> np.ndarray:
        """The ids of the images that pass every filter, ascending."""
        return self.ids[self.mask(filters)]

    def _within(self, lat: float, lon: float, km: float, keep: np.ndarray) -> np.ndarray:
        """Rows within `km` of (lat, lon) (haversine), computed only where `keep` is set and a
        bounding box lets a row through."""
        out = np.zeros(len(self.ids), bool)
        dlat = math.degrees(km / EARTH_KM)
        band = self._by_lat[np.searchsorted(self._lats, lat - dlat, side="left"):
                            np.searchsorted(self._lats, lat + dlat, side="right")]
        rows = np.sort(band[keep[band]])
        cos = math.cos(math.radians(lat))
        if len(rows) and cos > 1e-6 and abs(lat) + dlat < 90:
            dlon = math.degrees(km / (EARTH_KM * cos))
            if dlon < 180:  # the longitude box, across the antimeridian too
                gap = np.abs(self.lon[rows] - lon)
                rows = rows[np.minimum(gap, 360.0 - gap) <= dlon]
        if len(rows):
            out[rows] = _km(lat, lon, self.lat[rows], self.lon[rows]) <= km
        return out

    def taken_of(self, ids: Sequence[int]) -> np.ndarray:
        """Capture times of these ids (NaN when unknown or not in the frame)."""
        ids = np.asarray(ids, np.int64)
        out = np.full(len(ids), np.nan)
        if not len(self.ids) or not len(ids):
            return out
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        found = self.ids[pos] == ids
        out[found] = self.taken[pos[found]]
        return out


def _place_matches(place: tuple | None, text: str) -> bool:
    if place is None:
        return False
    wanted = fold(text)
    city, region, country, code = place
    if code and wanted == code.casefold():
        return True
    names = [fold(n) for n in (city, region, country) if n]
    if len(wanted) < 3:
        return wanted in names
    return any(wanted in name for name in names)


def _floats(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _codes(values: list) -> tuple[list, np.ndarray]:
    """Dictionary-encode a column: (distinct values, code per row; -1 for None)."""
    table: dict = {}
    codes = np.fromiter((-1 if v is None else table.setdefault(v, len(table)) for v in values),
                        np.int32, count=len(values))
    return list(table), codes


def _any_code(codes: np.ndarray, wanted: list[int]) -> np.ndarray:
    if not wanted:
        return np.zeros(len(codes), bool)
    if len(wanted) == 1:
        return codes == wanted[0]
    return np.isin(codes, np.asarray(wanted, np.int32))


def _km(lat: float, lon: float, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    p1, p2 = math.radians(lat), np.radians(lats)
    a = np.sin((p2 - p1) / 2) ** 2 + \
        math.cos(p1) * np.cos(p2) * np.sin(np.radians(lons - lon) / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.minimum(1.0, np.sqrt(a)))
