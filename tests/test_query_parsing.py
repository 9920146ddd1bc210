"""The `W:` weight prefix: a number, a colon, then a space or a non-digit. Texts that start
with digits and a colon ("10:00 alarm clock", "16:9 photo") stay whole, in the parser and in
what `clipdex search --json` echoes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL

import cli
from index import Library
from index.synthetic.scenes import write_scenes
from retrieval import parse_weighted
from retrieval.query import NEGATIVE_WEIGHT, terms_from


@pytest.mark.parametrize("raw, expected", [
    # weighted: a number, a colon, then a letter, a space or another non-digit
    ("2:sunset", (2.0, "sunset")),
    ("0.5: mountains", (0.5, "mountains")),
    ("2:a beach", (2.0, "a beach")),
    ("-1:x", (-1.0, "x")),
    (".5:x", (0.5, "x")),
    ("-.5:x", (-0.5, "x")),
    ("+3:x", (3.0, "x")),
    ("1.:x", (1.0, "x")),
    ("2 : x", (2.0, "x")),
    ("2: 3 people", (2.0, "3 people")),  # a space after the colon: weight 2 on "3 people"
    ("1: 2:sunset", (1.0, "2:sunset")),  # the escape for a text that looks weighted
    ("2:C:\\x.jpg", (2.0, "C:\\x.jpg")),
    # plain texts: a digit right after the colon, no number before it, or nothing after it
    ("10:00 alarm clock", (1.0, "10:00 alarm clock")),
    ("16:9 photo", (1.0, "16:9 photo")),
    ("12:30 lunch", (1.0, "12:30 lunch")),
    ("3:2 aspect ratio", (1.0, "3:2 aspect ratio")),
    ("2:3 people", (1.0, "2:3 people")),
    ("-1:30 offset", (1.0, "-1:30 offset")),
    ("10:00", (1.0, "10:00")),
    ("red: a circle", (1.0, "red: a circle")),
    ("a: b", (1.0, "a: b")),
    ("C:\\x.jpg", (1.0, "C:\\x.jpg")),
    ("2:", (1.0, "2:")),
    ("  a beach  ", (1.0, "a beach")),
])
def test_parse_weighted(raw: str, expected: tuple[float, str]) -> None:
    assert parse_weighted(raw) == expected


def test_the_default_weight_applies_only_to_plain_texts() -> None:
    assert parse_weighted("16:9 photo", default=0.5) == (0.5, "16:9 photo")
    assert parse_weighted("2:photo", default=0.5) == (2.0, "photo")


def test_terms_from_images_and_negatives(tmp_path: Path) -> None:
    named = tmp_path / "2:photo.jpg"  # a file whose name looks weighted is taken as named
    named.write_bytes(b"")
    terms = terms_from(["10:00 alarm clock"], images=["C:\\x.jpg", "3:C:\\y.jpg", str(named)],
                       negatives=["16:9 photo", "2:people", "1: 12:30"])
    assert [(t.kind, t.value, t.weight) for t in terms] == [
        ("text", "10:00 alarm clock", 1.0),
        ("image", "C:\\x.jpg", 1.0),
        ("image", "C:\\y.jpg", 3.0),
        ("image", str(named), 1.0),
        ("text", "16:9 photo", -NEGATIVE_WEIGHT),
        ("text", "people", -2.0),
        ("text", "12:30", -1.0),
    ]


def test_the_server_reads_weights_the_same_way() -> None:
    pytest.importorskip("fastapi")
    from retrieval.server.service import SearchParams, search_query

    query = search_query(SearchParams(texts=["12:30 lunch", "2:sunset"],
                                      negatives=["3:2 aspect ratio"]), [])
    assert [(t.value, t.weight) for t in query.terms] == [
        ("12:30 lunch", 1.0), ("sunset", 2.0), ("3:2 aspect ratio", -NEGATIVE_WEIGHT)]


# --- through the CLI ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parsing")
    write_scenes(root / "photos", 4, size=64)
    with Library.open(root / "home") as library:
        library.index([root / "photos"], model=TEST_MODEL)
    return root / "home"


def echoed_terms(home: Path, *args: str) -> list[tuple[str, str, float]]:
    result = CliRunner().invoke(cli.main, ["--home", str(home), "search", *args, "--json"])
    assert result.exit_code == 0, result.output
    terms = json.loads(result.stdout)["query"]["terms"]
    return [(t["kind"], t["value"], t["weight"]) for t in terms]


def test_cli_echoes_texts_that_start_with_a_time_or_a_ratio(home: Path) -> None:
    assert echoed_terms(home, "10:00 alarm clock", "-t", "16:9 photo", "-t", "12:30 lunch",
                        "-t", "3:2 aspect ratio", "--not", "2:3 people") == [
        ("text", "10:00 alarm clock", 1.0),
        ("text", "16:9 photo", 1.0),
        ("text", "12:30 lunch", 1.0),
        ("text", "3:2 aspect ratio", 1.0),
        ("text", "2:3 people", -NEGATIVE_WEIGHT),
    ]


def test_cli_echoes_weights(home: Path) -> None:
    assert echoed_terms(home, "2:sunset", "-t", "0.5: mountains", "-t", ".5:x",
                        "-t", "red: a circle", "--not", "-1:x", "--not", "2: 3 people") == [
        ("text", "sunset", 2.0),
        ("text", "mountains", 0.5),
        ("text", "x", 0.5),
        ("text", "red: a circle", 1.0),
        ("text", "x", -1.0),
        ("text", "3 people", -2.0),
    ]


def test_cli_unquoted_words_form_one_plain_text(home: Path) -> None:
    assert echoed_terms(home, "10:00", "alarm", "clock") == [("text", "10:00 alarm clock", 1.0)]


def test_cli_windows_style_image_path_is_named_whole(home: Path) -> None:
    for given, named in (("C:\\x.jpg", "C:\\x.jpg"), ("2:C:\\x.jpg", "C:\\x.jpg")):
        result = CliRunner().invoke(cli.main, ["--home", str(home), "search", "--image", given])
        assert result.exit_code == 2, result.output
        assert f"query image not found: {named}\n" in result.output
