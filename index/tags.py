"""Zero-shot tags: CLIP's text tower scores each image against a list of labels.

A vocabulary is groups of labels (e.g. "shape": circle, square, …); each label's vector is the
mean of its prompts' unit vectors ("a photo of a {}.", …: prompt ensembling, as CLIP's paper
does for ImageNet), normalised again. Per group, an image's scores are a softmax over the
group's labels at CLIP's logit scale (100); it is tagged with its best label, and with any
other scoring at least TAG_MIN_SCORE. The built-in vocabulary is the scene generator's (shapes
and colours) for `tiny`, and a list of everyday concepts for real models; `--labels FILE`
gives one's own.

Label files are text: one label per line, `# comments` and blank lines ignored, and a line
`[name]` starting a group (labels before any group are in the group "tag").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageProblem

__all__ = ["GENERAL_LABELS", "LOGIT_SCALE", "TAG_MIN_SCORE", "Tag", "Vocabulary",
           "builtin_vocabulary", "label_vectors", "read_labels", "tag_vectors"]

LOGIT_SCALE = 100.0  # CLIP's learned temperature, about 100 for the released models
TAG_MIN_SCORE = 0.3  # besides its best label per group, an image keeps labels scoring this
MAX_LABELS = 2000
MAX_LABEL_CHARS = 100

GENERAL_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.", "a photo of a small {}.",
                     "a photo of a large {}.", "a good photo of a {}.")
GENERAL_LABELS = (
    "person", "child", "baby", "group of people", "selfie", "dog", "cat", "bird", "horse",
    "fish", "insect", "flower", "tree", "plant", "food", "cake", "fruit", "drink", "car",
    "bicycle", "motorcycle", "bus", "train", "boat", "airplane", "beach", "sea", "lake",
    "river", "mountain", "forest", "desert", "snow", "sky", "sunset", "night sky", "city",
    "street", "building", "house", "bridge", "church", "castle", "room", "kitchen",
    "bedroom", "office", "restaurant", "park", "garden", "road", "farm", "stadium",
    "concert", "wedding", "birthday party", "sports", "book", "computer", "phone",
    "screenshot", "document", "painting", "drawing", "toy", "clothing", "shoes", "art",
    "statue", "museum", "market", "shop", "waterfall", "cave", "island", "field",
)


@dataclass(frozen=True)
class Tag:
    group: str
    label: str
    score: float  # softmax over the group's labels


@dataclass(frozen=True)
class Vocabulary:
    """Groups of labels, each group with the prompts its labels are written into."""

    groups: dict[str, tuple[str, ...]]
    templates: dict[str, tuple[str, ...]]
    source: str  # "builtin:scenes", "builtin:general" or the label file's path

    def to_json(self) -> str:
        return json.dumps({"groups": {g: list(v) for g, v in self.groups.items()},
                           "templates": {g: list(v) for g, v in self.templates.items()},
                           "source": self.source})

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        data = json.loads(text)
        return cls({g: tuple(v) for g, v in data["groups"].items()},
                   {g: tuple(v) for g, v in data["templates"].items()}, data["source"])

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.groups.values())


def builtin_vocabulary(model: str) -> Vocabulary:
    """The scene vocabulary for `tiny` (trained on those scenes), else everyday concepts."""
    if model == "tiny":
        from .synthetic.scenes import COLOURS, SHAPES

        # measured on 400 generated scenes (tests/test_tags.py holds ≥ 0.9): shapes 0.998 with
        # these prompts, colours 1.0 with the colour written before each shape
        return Vocabulary(
            {"shape": tuple(SHAPES), "colour": tuple(COLOURS)},
            {"shape": ("a {}", "an image of a {}", "a large {}", "a small {}",
                       "a photo of a {}"),
             "colour": tuple(f"a {{}} {shape}" for shape in SHAPES)},
            "builtin:scenes")
    return Vocabulary({"tag": GENERAL_LABELS}, {"tag": GENERAL_TEMPLATES}, "builtin:general")


def read_labels(path: str | Path) -> Vocabulary:
    """A label file (see the module docstring). UsageProblem when it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageProblem(f"--labels: cannot read {path}: {reason}") from None
    groups: dict[str, list[str]] = {}
    group = "tag"
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            group = " ".join(line[1:-1].split()) or "tag"
            continue
        if len(line) > MAX_LABEL_CHARS:
            raise UsageProblem(f"--labels: {path}:{number}: a label is at most "
                               f"{MAX_LABEL_CHARS} characters")
        labels = groups.setdefault(group, [])
        if line.lower() not in (label.lower() for label in labels):
            labels.append(" ".join(line.split()))
    total = sum(len(v) for v in groups.values())
    if total == 0:
        raise UsageProblem(f"--labels: {path} lists no labels (one per line; # comments)")
    if total > MAX_LABELS:
        raise UsageProblem(f"--labels: {path} lists {total} labels; at most {MAX_LABELS}")
    single = [g for g, v in groups.items() if len(v) < 2]
    if single:
        raise UsageProblem(f"--labels: group {single[0]!r} has one label; a group needs two "
                           f"or more to choose between")
    return Vocabulary({g: tuple(v) for g, v in groups.items()},
                      {g: GENERAL_TEMPLATES for g in groups}, str(path))


def label_vectors(embedder, vocabulary: Vocabulary) -> dict[str, np.ndarray]:
    """group -> (labels × dim) unit vectors, each the normalised mean of its prompts'."""
    out: dict[str, np.ndarray] = {}
    for group, labels in vocabulary.groups.items():
        templates = vocabulary.templates[group]
        texts = [t.format(label) for label in labels for t in templates]
        vectors = np.asarray(embedder.encode_texts(texts), np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        means = vectors.reshape(len(labels), len(templates), -1).mean(axis=1)
        out[group] = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
    return out


def tag_vectors(image_vectors: np.ndarray, vocabulary: Vocabulary,
                labels: dict[str, np.ndarray]) -> list[list[Tag]]:
    """The tags of each image vector: per group its best label and any scoring ≥
    TAG_MIN_SCORE (softmax over the group at LOGIT_SCALE)."""
    out: list[list[Tag]] = [[] for _ in range(len(image_vectors))]
    if not len(image_vectors):
        return out
    for group, names in vocabulary.groups.items():
        logits = LOGIT_SCALE * (image_vectors @ labels[group].T)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        for row in range(len(image_vectors)):
            kept = np.flatnonzero(probs[row] >= TAG_MIN_SCORE)
            for col in [best[row], *(c for c in kept if c != best[row])]:
                out[row].append(Tag(group, names[col], float(probs[row, col])))
    return out

