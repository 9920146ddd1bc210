"""index.clip_tokenizer against open_clip's SimpleTokenizer, token for token, on >10,000 texts."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from open_clip.tokenizer import SimpleTokenizer

from index import clip_tokenizer
from index.clip_tokenizer import CLEAN_MODES, ClipTokenizer, describe_tokenizer
from index.errors import ModelUnavailable
from index.synthetic import scenes

REPO = Path(__file__).resolve().parents[1]

HANDWRITTEN = [
    "",
    " ",
    "   \t\n  ",
    "a",
    "A",
    "a photo of a cat",
    "A Photo Of A CAT",
    # accents, composed and decomposed
    "café crème brûlée",
    "cafe\u0301 cre\u0300me",
    "Ångström Øresund ßtraße İstanbul ǅemal",
    "naïve façade coöperate résumé",
    "Ελληνικά Русский язык Українська",
    # emoji: plain, skin tones, ZWJ families, flags, keycaps, variation selectors
    "😀 😃 😄 🐱‍👤",
    "👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈",
    "🇫🇷🇯🇵 1️⃣ #️⃣ ❤️ ♥",
    "a red 🔴 circle ⭕ on a 🟦 background",
    # CJK, Korean, Thai, Indic
    "日本語のテキスト",
    "中文字符 一只红色的圆",
    "한국어 텍스트",
    "ภาษาไทย हिन्दी বাংলা",
    "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３",
    # right-to-left
    "مرحبا بالعالم",
    "שלום עולם",
    "mixed مرحبا and שלום text",
    "\u202eright-to-left override\u202c",
    # HTML entities, double escaped
    "fish &amp; chips",
    "&lt;b&gt;bold&lt;/b&gt;",
    "it&#39;s &quot;quoted&quot;",
    "&amp;amp; &amp;lt; &amp;#39;",
    "&amp;amp;amp; triple",
    "&nbsp;&copy;&eacute;&hellip;&#x263A;&#128512;",
    "<b>real tags</b> <br/> <a href='x'>link</a>",
    "&notanentity; & alone &",
    # ftfy unescapes only when there is no "<"; then open_clip's two html.unescape calls count
    "<b>&amp;amp;</b>",
    "a < b &amp;amp;lt; c",
    "x<y &amp;#39;z&amp;quot;",
    # mojibake that ftfy repairs
    "cafÃ©",
    "Ã¼ber naÃ¯ve",
    "â€œquotedâ€\x9d â€” dash",
    "Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "The Mona Lisa doesnâ€™t have eyebrows.",
    "ãƒ†ã‚¹ãƒˆ",
    # control characters and terminal escapes
    "nul\x00byte",
    "bell\x07 backspace\x08 vt\x0b ff\x0c",
    "\x01\x02\x03\x1f\x7f",
    "next line\x85here",
    "zero\u200bwidth\u200cjoin\u200d",
    "\ufeffbom at start",
    "\x1b[31mred\x1b[0m text",
    "\x1b[1;32mbold green\x1b[0m",
    "\x1b]0;window title\x07after",
    "\x1b[2J\x1b[H cleared",
    "soft\xadhyphen",
    # whitespace runs
    "two  spaces",
    "tab\tseparated\tvalues",
    "line\nbreaks\r\nand\rreturns",
    "   leading and trailing   ",
    "no\u00a0break\u2009thin\u3000ideographic\u2028line\u2029para",
    "\t\t\t",
    "\n\n\n",
    # numbers and punctuation
    "3.14159 2,718 1,000,000 -42 +7 1e10 0x1F",
    "$5.99 €10 £3 ¥100 ₹50 50%",
    "!!! ??? ... --- ___ *** ### @@@",
    "(parens) [brackets] {braces} <angles>",
    "a/b\\c|d~e`f^g",
    "'s 't 're 've 'm 'll 'd",
    "DON'T WE'RE THEY'LL I'M IT'S",
    "rock'n'roll o'clock ''double''",
    "\"quoted\" “curly” ‘single’ «guillemets»",
    "１２３ ١٢٣ ४५६ ½ ² Ⅻ",
    "user@example.com http://example.com/a?b=c&d=e#f",
    "snake_case_words and kebab-case-words",
    "C++ C# F# .NET node.js",
    # the special tokens and BPE markers as text
    "<start_of_text>",
    "<end_of_text>",
    "<START_OF_TEXT> shouting",
    "a <start_of_text> in the <end_of_text> middle",
    "</w> marker",
    # over-long texts
    "a red circle " * 40,
    "x" * 500,
    "1234567890" * 20,
    "supercalifragilisticexpialidocious " * 10,
    "😀" * 100,
    "日本" * 100,
    "word, " * 100,
    "&amp;" * 60,
]

_RANGES = [
    (0x20, 0x7E),
    (0x20, 0x7E),
    (0x00, 0x1F),
    (0x7F, 0x9F),
    (0xA0, 0x24F),
    (0x300, 0x36F),
    (0x370, 0x52F),
    (0x590, 0x6FF),
    (0x900, 0x97F),
    (0xE00, 0xE7F),
    (0x2000, 0x206F),
    (0x20A0, 0x20CF),
    (0x2190, 0x23FF),
    (0x3000, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xD800, 0xDFFF),
    (0xE000, 0xF8FF),
    (0xFB00, 0xFFFF),
    (0x1F300, 0x1FAFF),
    (0x10000, 0x10FFFF),
]
_WORDS = [
    "red", "blue", "circle", "star", "photo", "of", "a", "the", "background", "dog", "cat",
    "&amp;", "&lt;", "&#39;", "don't", "it's", "café", "日本", "😀", "\t", "\n", "  ", "42",
    "3.5", "...", "!", "?", "'s", "x", "ÿ", "Ã©", "\x1b[0m", "<end_of_text>", "_", "-",
]


def _random_texts(rng: random.Random, count: int) -> list[str]:
    """Random code points from many scripts, plus random mixes of awkward words."""
    texts = []
    for _ in range(count // 2):
        chars = []
        for _ in range(rng.randint(0, 30)):
            low, high = rng.choice(_RANGES)
            chars.append(chr(rng.randint(low, high)))
        texts.append("".join(chars))
    for _ in range(count - count // 2):
        words = rng.choices(_WORDS, k=rng.randint(0, 12))
        words = [w.upper() if rng.random() < 0.2 else w for w in words]
        texts.append(rng.choice(["", " ", "  "]).join(words))
    return texts


def _scene_texts() -> list[str]:
    texts = []
    for i, scene in enumerate(scenes.generate(2500, seed=7)):
        texts.append(scenes.caption_for(scene, i))
        texts.append(scenes.short_caption(scene, i))
    return texts


def _corpus() -> list[str]:
    rng = random.Random(20261201)
    scene_texts = _scene_texts()
    decorated = [
        rng.choice(["", "  ", "\t", "&quot;", "😀 "])
        + (text.upper() if i % 3 == 0 else text)
        + rng.choice(["", ".", "!!", " &amp; more", "\n", " 日本"])
        for i, text in enumerate(rng.sample(scene_texts, 1500))
    ]
    long_texts = [" ".join(rng.sample(scene_texts, rng.randint(3, 12))) for _ in range(300)]
    return HANDWRITTEN + scene_texts + decorated + long_texts + _random_texts(rng, 3500)


CORPUS = _corpus()


@pytest.fixture(scope="module")
def tiny_tokenizer() -> SimpleTokenizer:
    return open_clip.get_tokenizer(f"local-dir:{REPO / 'index' / 'models' / 'tiny'}")


@pytest.fixture(scope="module")
def vit_tokenizer() -> SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")


def _rebuilt(tokenizer: SimpleTokenizer) -> ClipTokenizer:
    described = describe_tokenizer(tokenizer)
    assert described is not None
    config, source = described
    return ClipTokenizer(source, context_length=config["context_length"], clean=config["clean"])


@pytest.fixture(scope="module")
def tiny_ours(tiny_tokenizer: SimpleTokenizer) -> ClipTokenizer:
    return _rebuilt(tiny_tokenizer)


@pytest.fixture(scope="module")
def vit_ours(vit_tokenizer: SimpleTokenizer) -> ClipTokenizer:
    return _rebuilt(vit_tokenizer)


def _assert_same(
    ours: ClipTokenizer, theirs: SimpleTokenizer, texts: list[str], context_length: int = 0
) -> None:
    got = ours(texts)
    want = theirs(texts, context_length=context_length or None).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape
    bad = [texts[i] for i in np.flatnonzero((got != want).any(axis=1))]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:5]!r}"


def test_corpus_is_big_and_varied() -> None:
    assert len(CORPUS) >= 10_000
    assert any(len(text) > 300 for text in CORPUS)


@pytest.mark.parametrize("which, context_length", [("tiny", 32), ("vit", 77)])
def test_matches_open_clip_token_for_token(
    which: str, context_length: int, request: pytest.FixtureRequest
) -> None:
    theirs = request.getfixturevalue(f"{which}_tokenizer")
    ours = request.getfixturevalue(f"{which}_ours")
    assert ours.context_length == theirs.context_length == context_length
    assert (ours.sot_token, ours.eot_token) == (theirs.sot_token_id, theirs.eot_token_id)
    _assert_same(ours, theirs, CORPUS)


def test_truncation_keeps_the_end_token_last(tiny_ours: ClipTokenizer) -> None:
    row = tiny_ours("a red circle " * 40)[0]
    assert row[0] == tiny_ours.sot_token and row[-1] == tiny_ours.eot_token and (row != 0).all()
    short = tiny_ours("")[0]
    assert list(short[:2]) == [tiny_ours.sot_token, tiny_ours.eot_token] and not short[2:].any()


@pytest.mark.parametrize("clean", [mode for mode in CLEAN_MODES if mode != "lower"])
def test_other_clean_modes(clean: str) -> None:
    theirs = SimpleTokenizer(context_length=40, clean=clean)
    ours = _rebuilt(theirs)
    _assert_same(ours, theirs, HANDWRITTEN + CORPUS[-1500:])


@pytest.mark.parametrize("context_length", [1, 2, 3, 5])
def test_tiny_contexts(context_length: int, vit_tokenizer: SimpleTokenizer) -> None:
    ours = ClipTokenizer(open_clip.tokenizer.default_bpe(), context_length=context_length)
    _assert_same(ours, vit_tokenizer, HANDWRITTEN, context_length)


def test_single_string_tuple_and_empty_list(
    tiny_ours: ClipTokenizer, tiny_tokenizer: SimpleTokenizer
) -> None:
    single = tiny_ours("a photo of a cat")
    assert single.shape == (1, 32)
    assert np.array_equal(single, tiny_tokenizer("a photo of a cat").numpy())
    assert np.array_equal(tiny_ours(("a", "b")), tiny_ours(["a", "b"]))
    empty = tiny_ours([])
    assert empty.shape == (0, 32) and empty.dtype == np.int64


def test_a_full_cache_starts_over(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: SimpleTokenizer
) -> None:
    monkeypatch.setattr(clip_tokenizer, "_CACHE_LIMIT", 5)
    ours = _rebuilt(tiny_tokenizer)
    _assert_same(ours, tiny_tokenizer, HANDWRITTEN)
    assert len(ours._cache) <= 5


def test_from_config_round_trip(tmp_path: Path, tiny_tokenizer: SimpleTokenizer) -> None:
    described = describe_tokenizer(tiny_tokenizer)
    assert described is not None
    config, source = described
    assert Path(source).is_absolute() and Path(source).name == config["vocab"]
    config = json.loads(json.dumps(config))
    assert config["kind"] == "clip-bpe" and config["clean"] == "lower"
    shutil.copyfile(source, tmp_path / config["vocab"])
    ours = ClipTokenizer.from_config(config, tmp_path)
    _assert_same(ours, tiny_tokenizer, HANDWRITTEN)


def test_from_config_refuses_a_wrong_or_missing_vocab(
    tmp_path: Path, tiny_tokenizer: SimpleTokenizer
) -> None:
    described = describe_tokenizer(tiny_tokenizer)
    assert described is not None
    config, _ = described
    with pytest.raises(ModelUnavailable):
        ClipTokenizer.from_config(config, tmp_path)
    (tmp_path / config["vocab"]).write_bytes(b"not the vocab")
    with pytest.raises(ModelUnavailable):
        ClipTokenizer.from_config(config, tmp_path)
    with pytest.raises(ModelUnavailable):
        ClipTokenizer.from_config({**config, "kind": "sentencepiece"}, tmp_path)
    with pytest.raises(ModelUnavailable):
        ClipTokenizer.from_config({"kind": "clip-bpe"}, tmp_path)


def test_bad_arguments_are_refused() -> None:
    vocab = open_clip.tokenizer.default_bpe()
    with pytest.raises(ValueError):
        ClipTokenizer(vocab, clean="upper")
    with pytest.raises(ValueError):
        ClipTokenizer(vocab, context_length=0)


class _Subclass(SimpleTokenizer):
    pass


@pytest.mark.parametrize(
    "make",
    [
        lambda: SimpleTokenizer(reduction_mask="simple"),
        lambda: SimpleTokenizer(additional_special_tokens=["<mask>"]),
        lambda: SimpleTokenizer(context_length=None),
        lambda: _Subclass(),
        lambda: object(),
        lambda: "ViT-B-32",
    ],
    ids=["reduction-mask", "extra-special-token", "no-context", "subclass", "object", "str"],
)
def test_describe_refuses_what_it_cannot_reproduce(make) -> None:
    assert describe_tokenizer(make()) is None


def test_describe_refuses_an_unknown_clean_function() -> None:
    tokenizer = SimpleTokenizer()
    tokenizer.clean_fn = str.lower
    assert describe_tokenizer(tokenizer) is None


def test_import_and_use_stay_torch_free() -> None:
    code = (
        "import sys, index.clip_tokenizer as t; "
        "heavy = lambda: [m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules]; "
        "print(heavy()); t.ClipTokenizer(sys.argv[1])(['a photo of a cat']); print(heavy())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, open_clip.tokenizer.default_bpe()],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["[]", "[]"]


def test_printable_ascii_without_an_ampersand_is_what_ftfy_leaves_alone() -> None:
    """The tokenizer skips ftfy (and its import) for such texts: ftfy must agree on the whole
    corpus and on random printable ASCII, and a plain query must not import it."""
    import ftfy

    rng = random.Random(5)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
               for _ in range(20_000)]
    plain = [t for t in [*_corpus(), *randoms]
             if t.isascii() and t.isprintable() and "&" not in t]
    assert len(plain) > 20_000
    assert [ftfy.fix_text(t) for t in plain] == plain
    code = (
        "import sys, index.clip_tokenizer as t; "
        "tok = t.ClipTokenizer(sys.argv[1]); tok(['a red circle, 3 squares!']); "
        "print('ftfy' in sys.modules); tok(['caf\\u00e9 &amp; cr\\u00e8me']); "
        "print('ftfy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, open_clip.tokenizer.default_bpe()],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]
