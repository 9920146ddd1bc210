"""A torch-free copy of open_clip's CLIP BPE tokenizer (`open_clip.tokenizer.SimpleTokenizer`).

The query process turns search text into token ids before handing them to the text tower; going
through open_clip for that would import torch (seconds) just to split words. `ClipTokenizer`
reproduces SimpleTokenizer's output token for token - same cleaning (ftfy, double HTML
unescape, whitespace collapse, lower case or canonicalisation), same pre-tokenising regex, same
byte-level BPE, same truncation (cut to the context, end-of-text token last) - using only numpy,
ftfy and regex. `describe_tokenizer` runs on the side that has open_clip loaded: it checks that a
tokenizer is one this module reproduces and says how to rebuild it from a copied vocab file.

regex is imported when a tokenizer is built, ftfy when a text first needs it (most queries
never do), neither when this module is imported.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelUnavailable

__all__ = ["CLEAN_MODES", "ClipTokenizer", "describe_tokenizer"]

KIND = "clip-bpe"
_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# SimpleTokenizer's pattern with its default special tokens, compiled with IGNORECASE
_PATTERN = (
    "|".join(_SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# the merges SimpleTokenizer reads: the vocab file's lines 1 .. 48894 (line 0 is a header)
_MERGE_LINES = slice(1, 49152 - 256 - 2 + 1)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_CACHE_LIMIT = 100_000  # words whose BPE is remembered; the cache starts over when full


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in the order the BPE vocab lists it:
    the printable bytes as themselves, then every other byte as a character from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


# also a str.translate table: it maps the latin-1 decoding of a word's UTF-8 bytes onto the
# BPE alphabet in one call
_BYTE_ALPHABET = _byte_alphabet()


def _collapse(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    """open_clip's canonicalize_text: underscores to spaces, no punctuation, lower case."""
    return _collapse(text.replace("_", " ").translate(_PUNCTUATION).lower())


def _lower(text: str) -> str:
    return _collapse(text).lower()


# what each clean mode does after ftfy, HTML unescaping and stripping
_FINISH: dict[str, Callable[[str], str]] = {
    "lower": _lower,
    "whitespace": _collapse,
    "canonicalize": _canonicalize,
}
CLEAN_MODES: tuple[str, ...] = tuple(_FINISH)


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer; calling it gives what open_clip's SimpleTokenizer gives."""

    context_length: int
    sot_token: int
    eot_token: int

    def __init__(
        self, vocab_path: str | os.PathLike, *, context_length: int = 77, clean: str = "lower"
    ) -> None:
        if clean not in _FINISH:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {CLEAN_MODES}")
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise ValueError(f"context_length must be an int, not {context_length!r}")
        if context_length < 1:
            raise ValueError(f"context_length must be at least 1, not {context_length}")
        import regex

        self._fix_text: Callable[[str], str] | None = None  # ftfy.fix_text, imported on need
        self._finish = _FINISH[clean]
        self._pat = regex.compile(_PATTERN, regex.IGNORECASE)
        self.context_length = context_length

        lines = gzip.decompress(Path(vocab_path).read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[_MERGE_LINES]]
        vocab = [
            *_BYTE_ALPHABET.values(),
            *(c + "</w>" for c in _BYTE_ALPHABET.values()),
            *("".join(merge) for merge in merges),
            *_SPECIAL_TOKENS,
        ]
        self._encoder: dict[str, int] = dict(zip(vocab, range(len(vocab))))
        self._ranks: dict[tuple[str, ...], int] = dict(zip(merges, range(len(merges))))
        self.sot_token = self._encoder[_SPECIAL_TOKENS[0]]
        self.eot_token = self._encoder[_SPECIAL_TOKENS[1]]
        self._specials = {t: (self._encoder[t],) for t in _SPECIAL_TOKENS}
        self._cache: dict[str, tuple[int, ...]] = dict(self._specials)

    @classmethod
    def from_config(cls, config: dict[str, Any], folder: str | os.PathLike) -> ClipTokenizer:
        """The tokenizer `describe_tokenizer` described, its vocab file copied into `folder`.

        Raises ModelUnavailable when the config is not one this class reads or the vocab file
        is missing or not the one described (its SHA-256 differs).
        """
        try:
            if config["kind"] != KIND:
                raise ValueError(f"tokenizer kind {config['kind']!r} is not {KIND!r}")
            path = Path(folder) / config["vocab"]
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != config["vocab_sha256"]:
                raise ValueError(f"{path} is not the vocab file the model was saved with")
            return cls(path, context_length=config["context_length"], clean=config["clean"])
        except KeyError as exc:
            raise ModelUnavailable(f"tokenizer config lacks {exc}") from exc
        except (OSError, EOFError, ValueError, TypeError) as exc:
            raise ModelUnavailable(f"cannot load the CLIP tokenizer: {exc}") from exc

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids, int64 [len(texts), context_length]: start, BPE ids, end, zero padding.

        A text too long for the context is cut to `context_length` ids, the last replaced by
        the end-of-text token. A single string counts as a list of one.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [self._encode(text) for text in texts]
        out = np.zeros((len(rows), self.context_length), dtype=np.int64)
        for i, ids in enumerate(rows):
            ids = [self.sot_token, *ids, self.eot_token]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_token
            out[i, : len(ids)] = ids
        return out

    def _clean(self, text: str) -> str:
        return self._finish(html.unescape(html.unescape(self._fixed(text))).strip())

    def _fixed(self, text: str) -> str:
        """ftfy.fix_text(text). Printable ASCII without "&" is what ftfy leaves as it is (every
        fix it makes needs a non-ASCII or control character, or an HTML entity), so most
        queries never import ftfy: ~60 ms of a cold query (tested against ftfy)."""
        if text.isascii() and text.isprintable() and "&" not in text:
            return text
        if self._fix_text is None:
            import ftfy

            self._fix_text = ftfy.fix_text
        return self._fix_text(text)

    def _encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start and end tokens."""
        ids: list[int] = []
        for word in self._pat.findall(self._clean(text)):
            key = word.encode("utf-8").decode("latin-1").translate(_BYTE_ALPHABET)
            cached = self._cache.get(key)
            if cached is None:
                cached = self._bpe(key)
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache = dict(self._specials)
                self._cache[key] = cached
            ids.extend(cached)
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge the word's symbols, lowest-ranked pair first, until no ranked pair is left."""
        ranks = self._ranks
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            best: tuple[str, str] | None = None
            best_rank = sys.maxsize
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self._encoder[s] for s in symbols)


def describe_tokenizer(tokenizer: object) -> tuple[dict[str, Any], str] | None:
    """How to rebuild an open_clip tokenizer torch-free, or None when this module cannot.

    Returns `(config, vocab_source)`: `config` is JSON-able (kind, context_length, clean, vocab
    - the vocab file's name - and vocab_sha256) and goes to `ClipTokenizer.from_config`;
    `vocab_source` is the absolute path of the vocab file to copy, under that name, into the
    folder given to from_config. None for anything but a plain SimpleTokenizer with open_clip's
    vocab and special tokens, a clean mode of CLEAN_MODES, no reduction_mask and an int
    context length (HFTokenizer, SigLipTokenizer and subclasses give None).
    """
    module = sys.modules.get("open_clip.tokenizer")
    simple = getattr(module, "SimpleTokenizer", None)
    if simple is None or type(tokenizer) is not simple:
        return None
    modes = {getattr(module, f"_clean_{mode}", None): mode for mode in CLEAN_MODES}
    modes.pop(None, None)
    clean = modes.get(getattr(tokenizer, "clean_fn", None))
    context_length = getattr(tokenizer, "context_length", None)
    pattern = getattr(tokenizer, "pat", None)
    if (
        clean is None
        or getattr(tokenizer, "reduction_fn", None) is not None
        or isinstance(context_length, bool)
        or not isinstance(context_length, int)
        or context_length < 1
        or getattr(pattern, "pattern", None) != _PATTERN
    ):
        return None
    source = Path(module.default_bpe()).resolve()
    try:
        ours = ClipTokenizer(source, context_length=context_length, clean=clean)
    except (OSError, EOFError, ValueError):
        return None
    if (
        pattern.flags != ours._pat.flags
        or getattr(tokenizer, "encoder", None) != ours._encoder
        or getattr(tokenizer, "bpe_ranks", None) != ours._ranks
    ):
        return None
    config = {
        "kind": KIND,
        "context_length": context_length,
        "clean": clean,
        "vocab": source.name,
        "vocab_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    return config, str(source)
