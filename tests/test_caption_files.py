"""Hostile caption files through the real parser and the real `clipdex captions add`.

A bad line (row, annotation, image record) is skipped with its reason; a bad whole file is one
CaptionFileError, shown by the CLI as one line. Never a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from sqlalchemy import select

import cli
from index import Library
from index.captions import MAX_CAPTION_CHARS, parse_caption_file
from index.errors import CaptionFileError, UsageProblem
from index.store import CaptionRow

MODEL = TEST_MODEL  # the `test` embedder: these tests look at storage, not meaning
DEEP = "[" * 100_000  # past json's recursion limit

pytestmark = pytest.mark.usefixtures("one_model_load")


# --- helpers --------------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *lines: str) -> Path:
    return write(path, "".join(line + "\n" for line in lines))


def coco(path: Path, images: object, annotations: object) -> Path:
    return write(path, json.dumps({"images": images, "annotations": annotations}))


def good_coco_images() -> list[dict]:
    return [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]


def add(home: Path, path: Path, *extra: str):
    return CliRunner().invoke(cli.main, ["--home", str(home), "captions", "add", str(path),
                                         "--model", MODEL, *extra], catch_exceptions=False)


def added(home: Path, path: Path, *extra: str) -> dict:
    result = add(home, path, "--json", *extra)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def stored_texts(home: Path) -> list[str]:
    with Library.open(home) as library, library.store.session() as s:
        return list(s.scalars(select(CaptionRow.text).order_by(CaptionRow.id)))


# --- 1. lines and files that used to raise ----------------------------------------------------

def test_jsonl_line_nested_too_deeply_is_skipped(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "c.jsonl", '{"caption": "first"}', DEEP, '{"caption": "third"}')
    parsed, problems = parse_caption_file(path)
    assert [(c.text, c.line) for c in parsed] == [("first", 1), ("third", 3)]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: ")
    assert "nested too deeply" in problems[0]


def test_lone_surrogate_caption_is_skipped_in_jsonl_and_coco(tmp_path: Path) -> None:
    lines = jsonl(tmp_path / "c.jsonl", '{"caption": "bad \\ud800 text"}', '{"caption": "ok"}')
    parsed, problems = parse_caption_file(lines)
    assert [c.text for c in parsed] == ["ok"]
    assert len(problems) == 1 and problems[0].startswith(f"{lines}:1: ")
    assert "not valid Unicode" in problems[0]

    path = tmp_path / "c.json"
    write(path, '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": ['
                '{"image_id": 1, "caption": "\\udfff"}, {"image_id": 1, "caption": "fine"}]}')
    parsed, problems = parse_caption_file(path)
    assert [(c.text, c.ref) for c in parsed] == [("fine", "a.jpg")]
    assert len(problems) == 1 and problems[0].startswith(f"{path}: annotation 1: ")
    assert "not valid Unicode" in problems[0]


@pytest.mark.parametrize("images", [5, "a.jpg", {"id": 1}])
def test_coco_images_not_a_list_is_a_file_error(tmp_path: Path, images: object) -> None:
    path = coco(tmp_path / "c.json", images, [{"image_id": 1, "caption": "x"}])
    with pytest.raises(CaptionFileError, match="'images' is not a list"):
        parse_caption_file(path)


def test_coco_without_images_still_reads_captions(tmp_path: Path) -> None:
    for images in (None, []):
        path = coco(tmp_path / "c.json", images, [{"image_id": 1, "caption": "x"}])
        assert [(c.text, c.ref) for c in parse_caption_file(path)[0]] == [("x", None)]


def test_coco_unhashable_image_id_is_skipped(tmp_path: Path) -> None:
    path = coco(tmp_path / "c.json", good_coco_images(),
                [{"image_id": [1], "caption": "list id"}, {"image_id": {"id": 1}, "caption": "obj"},
                 {"image_id": 2, "caption": "kept"}, {"image_id": 99, "caption": "unknown id"}])
    parsed, problems = parse_caption_file(path)
    assert [(c.text, c.ref, c.line) for c in parsed] == [("kept", "b.jpg", 3),
                                                         ("unknown id", None, 4)]
    assert [p.split(": ")[1] for p in problems] == ["annotation 1", "annotation 2"]
    assert all("image_id" in p for p in problems)


def test_coco_image_records_with_bad_ids_or_names_are_reported(tmp_path: Path) -> None:
    images = [{"id": {"nested": 1}, "file_name": "obj.jpg"}, {"id": [3], "file_name": "l.jpg"},
              {"id": 4, "file_name": 7}, "not a record", {"id": 5, "file_name": "e.jpg"}]
    path = coco(tmp_path / "c.json", images,
                [{"image_id": 5, "caption": "linked"}, {"image_id": 4, "caption": "unlinked"}])
    parsed, problems = parse_caption_file(path)
    assert [(c.text, c.ref) for c in parsed] == [("linked", "e.jpg"), ("unlinked", None)]
    assert [p.split(": ")[1] for p in problems] == [f"image {n}" for n in (1, 2, 3, 4)]


def test_coco_nested_too_deeply_is_a_file_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", DEEP)
    with pytest.raises(CaptionFileError, match="nested too deeply"):
        parse_caption_file(path)


def test_number_past_the_digit_limit(tmp_path: Path) -> None:
    huge = "1" * 5000  # int() refuses more than 4300 digits: a ValueError, not a decode error
    lines = jsonl(tmp_path / "c.jsonl", f'{{"caption": "x", "n": {huge}}}', '{"caption": "y"}')
    parsed, problems = parse_caption_file(lines)
    assert [c.text for c in parsed] == ["y"] and problems[0].startswith(f"{lines}:1: ")
    path = write(tmp_path / "c.json", f'{{"annotations": [], "n": {huge}}}')
    with pytest.raises(CaptionFileError, match="not usable JSON"):
        parse_caption_file(path)


def test_captions_and_references_that_are_not_text_are_skipped(tmp_path: Path) -> None:
    lines = jsonl(tmp_path / "c.jsonl", '{"caption": 5}', '{"caption": ["a", ["b"]]}',
                  '{"caption": {"x": {"y": []}}}', '{"caption": true}',
                  '{"caption": "path is a number", "path": 5}',
                  '{"caption": "path is an object", "path": {"a": [1]}}',
                  '{"caption": "kept", "path": "a.jpg"}', '{"caption": "no path", "path": null}')
    parsed, problems = parse_caption_file(lines)
    assert [(c.text, c.ref) for c in parsed] == [("kept", "a.jpg"), ("no path", None)]
    assert [p.split(": ")[0] for p in problems] == [f"{lines}:{n}" for n in range(1, 7)]
    assert "not text" in problems[0] and "image reference" in problems[4]

    path = coco(tmp_path / "c.json", good_coco_images(),
                [{"image_id": 1, "caption": {"a": [1, {"b": None}]}}, [1, 2], None, 7,
                 {"image_id": 1, "caption": 3.5}, {"image_id": 1, "caption": "good"}])
    parsed, problems = parse_caption_file(path)
    assert [c.text for c in parsed] == ["good"]
    assert [p.split(": ")[1] for p in problems] == [f"annotation {n}" for n in range(1, 6)]


def test_image_reference_with_a_lone_surrogate(tmp_path: Path) -> None:
    # \udcff is how a non-UTF-8 file name byte reads in Python (PEP 383): a real name, kept;
    # \ud800 is no file name at all
    lines = jsonl(tmp_path / "c.jsonl", '{"caption": "bad ref", "path": "x\\ud800.jpg"}',
                  '{"caption": "bytes ref", "path": "x\\udcff.jpg"}',
                  '{"caption": "nul ref", "path": "x\\u0000.jpg"}')
    parsed, problems = parse_caption_file(lines)
    assert [(c.text, c.ref) for c in parsed] == [("bytes ref", "x\udcff.jpg")]
    assert [p.split(": ")[0] for p in problems] == [f"{lines}:1", f"{lines}:3"]
    assert all("image reference" in p for p in problems)


def test_cli_skips_bad_lines_with_their_reasons(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "c.jsonl", '{"caption": "a good one"}', DEEP,
                 '{"caption": "\\ud800"}', '{"caption": "x", "path": "\\udbff"}',
                 '{"caption": 12}', '{"caption": "another good one", "path": "p.jpg"}')
    report = added(tmp_path / "home", path)
    assert (report["added"], report["skipped"]) == (2, 4)
    assert [p.split(": ")[0] for p in report["problems"]] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert stored_texts(tmp_path / "home") == ["a good one", "another good one"]

    plain = add(tmp_path / "home", path)
    assert plain.exit_code == 0 and "Traceback" not in plain.output
    assert "0 added, 2 duplicates" in plain.output and "4 skipped" in plain.output


@pytest.mark.parametrize("content, message", [
    ('{"images": 5, "annotations": [{"image_id": 1, "caption": "x"}]}', "'images' is not a list"),
    (DEEP, "nested too deeply"),
])
def test_cli_bad_coco_files_are_one_line_errors(tmp_path: Path, content: str,
                                                message: str) -> None:
    path = write(tmp_path / "c.json", content)
    assert message in one_line_error(add(tmp_path / "home", path))


def test_cli_coco_with_unhashable_ids_adds_the_rest(tmp_path: Path) -> None:
    images = good_coco_images() + [{"id": {"x": 1}, "file_name": "c.jpg"}]
    path = coco(tmp_path / "c.json", images,
                [{"image_id": [1], "caption": "list id"}, {"image_id": 1, "caption": "kept"}])
    report = added(tmp_path / "home", path)
    assert (report["added"], report["skipped"]) == (1, 2)


def test_caption_file_in_a_folder_whose_name_is_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / os.fsdecode(b"caf\xe9")  # a Latin-1 name: lone surrogates in Python
    path = write(folder / "c.csv", "path,caption\nimg.jpg,a caption\n")
    report = added(tmp_path / "home", path)
    assert report["added"] == 1
    with Library.open(tmp_path / "home") as library, library.store.session() as s:
        assert s.scalars(select(CaptionRow.image_ref)).all() == [str(folder / "img.jpg")]
    assert added(tmp_path / "home", path)["duplicates"] == 1


# --- 2. an unterminated quote in a CSV ----------------------------------------------------------

FIVE_ROWS = ('path,caption\n'
             'a.jpg,first caption\n'
             'b.jpg,"second caption, never closed\n'
             'c.jpg,third caption\n'
             'd.jpg,fourth caption\n'
             'e.jpg,fifth caption\n')


def test_unterminated_quote_is_reported_at_its_line_and_later_rows_recovered(
        tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", FIVE_ROWS)
    parsed, problems = parse_caption_file(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3: ")
    assert "quote" in problems[0]
    assert [(c.ref, c.text, c.line) for c in parsed] == [
        ("a.jpg", "first caption", 2), ("c.jpg", "third caption", 4),
        ("d.jpg", "fourth caption", 5), ("e.jpg", "fifth caption", 6)]


def test_unterminated_quote_in_a_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "c.tsv", FIVE_ROWS.replace(",", "\t"))
    parsed, problems = parse_caption_file(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3: ")
    assert [c.line for c in parsed] == [2, 4, 5, 6]


def test_quote_closed_by_a_later_row_is_found_too(tmp_path: Path) -> None:
    # the stray quote runs on until the next quote character, here a well-quoted field
    path = write(tmp_path / "c.csv", 'path,caption\na.jpg,"broken\nb.jpg,fine\n'
                                     'c.jpg,"quoted, with a comma"\nd.jpg,last\n')
    parsed, problems = parse_caption_file(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: ")
    assert [(c.text, c.line) for c in parsed] == [
        ("fine", 3), ("quoted, with a comma", 4), ("last", 5)]


def test_unterminated_quote_past_the_field_size_limit_is_recovered(tmp_path: Path) -> None:
    rows = [f"img_{n}.jpg,caption number {n} " + "x" * 80 for n in range(3000)]  # > 131072
    path = write(tmp_path / "c.csv", "path,caption\n" + rows[0] + "\n" + 'broken.jpg,"oops\n'
                 + "\n".join(rows[1:]) + "\n")
    parsed, problems = parse_caption_file(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3: ")
    assert len(parsed) == 3000 and parsed[-1].ref == "img_2999.jpg"


def test_multiline_quoted_caption_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", 'path,caption\na.jpg,"two\nlines"\nb.jpg,after\n'
                                     'c.jpg,"said ""hi""\nand left"\n')
    parsed, problems = parse_caption_file(path)
    assert problems == []
    assert [(c.text, c.line) for c in parsed] == [
        ("two\nlines", 2), ("after", 4), ('said "hi"\nand left', 5)]


def test_huge_field_is_a_row_problem_and_later_rows_are_read(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "path,caption\na.jpg,before\nb.jpg," + "w" * 200_000
                 + "\nc.jpg,after\n" + 'd.jpg,"' + "q" * 200_000 + '"\ne.jpg,last\n')
    parsed, problems = parse_caption_file(path)
    assert [(c.text, c.line) for c in parsed] == [("before", 2), ("after", 4), ("last", 6)]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:3", f"{path}:5"]
    assert all("field larger than field limit" in p for p in problems)


def test_cli_reports_the_unterminated_quote(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", FIVE_ROWS)
    report = added(tmp_path / "home", path)
    assert (report["added"], report["skipped"]) == (4, 1)
    assert report["problems"][0].startswith(f"{path}:3: ")
    assert max(len(t) for t in stored_texts(tmp_path / "home")) < 20
    plain = add(tmp_path / "home" / "again", path)
    assert f"skipped: {path}:3: " in plain.output


# --- 3. caption length and NUL bytes ----------------------------------------------------------

def test_long_caption_is_cut_to_max_caption_chars(tmp_path: Path) -> None:
    assert MAX_CAPTION_CHARS == 4096
    path = jsonl(tmp_path / "c.jsonl", json.dumps({"caption": "é" + "y" * 1_000_000}),
                 '{"caption": "short"}')
    parsed, problems = parse_caption_file(path)
    assert problems == [] and [len(c.text) for c in parsed] == [MAX_CAPTION_CHARS, 5]
    assert [c.truncated for c in parsed] == [True, False]
    assert parsed[0].text.startswith("éyyy")


def test_max_chars_keyword(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "caption\nexactly ten\nten chars!\n")
    parsed, _ = parse_caption_file(path, max_chars=10)
    assert [(c.text, c.truncated) for c in parsed] == [("exactly te", True),
                                                       ("ten chars!", False)]
    for bad in (0, -1, 10**9):
        with pytest.raises(UsageProblem, match="max_chars"):
            parse_caption_file(path, max_chars=bad)


def test_cut_never_splits_a_character(tmp_path: Path) -> None:
    # code points, and a letter stays with its combining accent, an emoji with its modifiers
    accented, family = "abcde\u0301", "ab\U0001f468\u200d\U0001f469\u200d\U0001f467"
    path = jsonl(tmp_path / "c.jsonl", json.dumps({"caption": accented}),
                 json.dumps({"caption": family}), json.dumps({"caption": "😀" * 9}))
    parsed, _ = parse_caption_file(path, max_chars=5)
    assert [c.text for c in parsed] == ["abcd", "ab", "😀" * 5]
    assert all(c.truncated for c in parsed)
    for caption in parsed:
        caption.text.encode("utf-8")
    # the cut moves back a little, never to nothing
    assert [c.text for c in parse_caption_file(path, max_chars=1)[0]] == ["a", "a", "😀"]


def test_nul_bytes_are_stripped(tmp_path: Path) -> None:
    table = write(tmp_path / "c.csv", "path,caption\na.jpg,nul\0in\0side\nb.jpg,\0\0\nc.jpg,ok\n")
    parsed, problems = parse_caption_file(table)
    assert [(c.text, c.nul_stripped) for c in parsed] == [("nulinside", True), ("ok", False)]
    assert [p.split(": ")[0] for p in problems] == [f"{table}:3"]  # nothing left: empty
    lines = jsonl(tmp_path / "c.jsonl", '{"caption": "a\\u0000b"}')
    assert [c.text for c in parse_caption_file(lines)[0]] == ["ab"]


def test_cli_cuts_long_captions_and_counts_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = jsonl(tmp_path / "c.jsonl", json.dumps({"caption": "z" * (2 * MAX_CAPTION_CHARS)}),
                 json.dumps({"caption": "with\u0000nul"}), json.dumps({"caption": "plain"}))
    report = added(home, path)
    assert (report["added"], report["truncated"], report["nul_stripped"]) == (3, 1, 1)
    assert report["max_chars"] == MAX_CAPTION_CHARS
    assert stored_texts(home) == ["z" * MAX_CAPTION_CHARS, "withnul", "plain"]
    plain = add(home / "again", path)
    assert plain.exit_code == 0, plain.output
    assert f"1 cut to {MAX_CAPTION_CHARS} characters" in plain.output
    assert "1 with NUL bytes removed" in plain.output


def test_cli_max_chars_option(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = jsonl(tmp_path / "c.jsonl", '{"caption": "a fairly long caption"}')
    report = added(home, path, "--max-chars", "8")
    assert (report["truncated"], report["max_chars"]) == (1, 8)
    assert stored_texts(home) == ["a fairly"]
    result = CliRunner().invoke(cli.main, ["--home", str(home), "captions", "add", str(path),
                                           "--max-chars", "0"])
    assert result.exit_code == 2
    too_big = add(home, path, "--max-chars", "100000")
    assert too_big.exit_code == 2 and "max_chars must be between 1 and 8192" in too_big.output


def test_cli_help_states_the_real_default() -> None:
    result = CliRunner().invoke(cli.main, ["captions", "add", "--help"])
    assert result.exit_code == 0
    assert f"[default: {MAX_CAPTION_CHARS}]" in " ".join(result.output.split())
