"""Training the expanders on a library's pairs, and saving/loading them beside it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from index.errors import ClipdexError, ModelMismatch

from .maps import RIDGE_LAMBDA, ContrastiveMap, MeanShift, RidgeMap, training_pairs

if TYPE_CHECKING:
    from index import Library

    from .contrastive import ContrastiveConfig
    from .prior import DiffusionPrior, TrainConfig

__all__ = ["FORMAT_VERSION", "SavedExpanders", "TrainReport", "load_expanders", "prior_paths",
           "train_expanders"]

WEIGHTS_FILE, META_FILE = "prior.safetensors", "prior.json"
FORMAT_VERSION = 2  # 2: with the contrastive map


@dataclass(frozen=True)
class TrainReport:
    pairs: int
    images: int
    steps: int  # the prior's
    seconds: float
    final_loss: float
    path: str
    contrastive_steps: int = 0
    contrastive_seconds: float = 0.0
    contrastive_loss: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def prior_paths(library: "Library") -> tuple[Path, Path]:
    home = library.settings.home
    return home / WEIGHTS_FILE, home / META_FILE


def train_expanders(library: "Library", *, train: "TrainConfig | None" = None,
                    contrastive: "ContrastiveConfig | None" = None,
                    progress: Callable[[int, int, float], None] | None = None) -> TrainReport:
    """Train the diffusion prior and the contrastive map, fit both baselines; save them all.

    Args:
        library: an open library with captions linked to images.
        train: the prior's steps/epochs, seed and optimiser settings (default TrainConfig()).
        contrastive: the contrastive map's settings (default ContrastiveConfig()).
        progress: progress(done_steps, total_steps, recent_loss) over both trainings.
    Returns:
        What was trained, and where it was saved.
    """
    import torch

    from .contrastive import ContrastiveConfig
    from .prior import TrainConfig, config_dict, save_prior_files, train_diffusion_prior

    model = _library_model(library)
    pairs = training_pairs(library)
    train = train or TrainConfig()
    contrastive = contrastive or ContrastiveConfig()
    prior_steps = train.total_steps(len(pairs))
    total = prior_steps + contrastive.total_steps(len(pairs))

    def prior_progress(done: int, _total: int, loss: float) -> None:
        if progress:
            progress(done, total, loss)

    def map_progress(done: int, _total: int, loss: float) -> None:
        if progress:
            progress(prior_steps + done, total, loss)

    prior, stats = train_diffusion_prior(pairs.text_vectors, pairs.image_vectors, train=train,
                                         progress=prior_progress)
    mapping, map_stats = ContrastiveMap.fit(pairs, config=contrastive, progress=map_progress)
    shift = MeanShift.fit(pairs.text_vectors, pairs.image_vectors)
    ridge = RidgeMap.fit(pairs.text_vectors, pairs.image_vectors)
    tensors = prior.tensors()
    tensors.update({"meanshift.delta": torch.from_numpy(shift.delta),
                    "ridge.weight": torch.from_numpy(ridge.weight),
                    "ridge.text_mean": torch.from_numpy(ridge.text_mean),
                    "ridge.image_mean": torch.from_numpy(ridge.image_mean),
                    "contrastive.weight": torch.from_numpy(mapping.weight),
                    "contrastive.bias": torch.from_numpy(mapping.bias)})
    images = int(len(np.unique(pairs.image_ids)))
    meta = {"format": FORMAT_VERSION, "model": model, "dim": int(pairs.text_vectors.shape[1]),
            "prior": config_dict(prior.config), "train": {**asdict(train), "steps": stats.steps},
            "ridge_lambda": RIDGE_LAMBDA, "pairs": len(pairs), "images": images,
            "seconds": round(stats.seconds, 2), "final_loss": round(stats.final_loss, 6),
            "contrastive": {**asdict(contrastive), "steps": map_stats.steps,
                            "seconds": round(map_stats.seconds, 2),
                            "identity_penalty": map_stats.identity_penalty,
                            "final_loss": round(map_stats.final_loss, 6)},
            "trained_at": time.time()}
    weights_path, meta_path = prior_paths(library)
    save_prior_files(weights_path, meta_path, tensors, meta)
    return TrainReport(len(pairs), images, stats.steps, stats.seconds, stats.final_loss,
                       str(weights_path), map_stats.steps, map_stats.seconds,
                       map_stats.final_loss)


def _library_model(library: "Library") -> str:
    from index.errors import EmptyLibrary

    model = library.model
    if model is None:
        raise EmptyLibrary(f"the library at {library.settings.home} is empty: index images and "
                           f"add captions first")
    return model


@dataclass(frozen=True)
class SavedExpanders:
    meta: dict
    prior: "DiffusionPrior"
    meanshift: MeanShift
    ridge: RidgeMap
    contrastive: ContrastiveMap


def load_expanders(library: "Library") -> SavedExpanders | None:
    """The expanders `clipdex prior train` saved for this library, or None if never trained.

    Raises ModelMismatch when they were trained for another model (or dimension).
    """
    weights_path, meta_path = prior_paths(library)
    if not meta_path.exists() or not weights_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClipdexError(f"cannot read {meta_path}: {exc}; run `clipdex prior train` again"
                           ) from None
    _check_meta(library, meta, meta_path)
    return _load_tensors(weights_path, meta)


def _check_meta(library: "Library", meta: dict, meta_path: Path) -> None:
    model, dim = library.model, library.store.model_fingerprint()
    if meta.get("format") != FORMAT_VERSION:
        raise ClipdexError(f"{meta_path} was written by another clipdex version; run "
                           f"`clipdex prior train` again")
    if meta.get("model") != model or (dim and meta.get("dim") != dim[1]):
        raise ModelMismatch(
            f"the prior in {meta_path.parent} was trained for model {meta.get('model')!r} "
            f"({meta.get('dim')}-d), but this library uses {model!r}"
            + (f" ({dim[1]}-d)" if dim else "") + ": run `clipdex prior train` to train one "
            "for this library")


def _load_tensors(weights_path: Path, meta: dict) -> SavedExpanders:
    from safetensors.torch import load_file

    from .prior import DiffusionPrior, config_from_dict

    try:
        tensors = load_file(str(weights_path))
        prior = DiffusionPrior.from_tensors(config_from_dict(meta["prior"]), tensors)
        shift = MeanShift(tensors["meanshift.delta"].numpy())
        ridge = RidgeMap(tensors["ridge.weight"].numpy(), tensors["ridge.text_mean"].numpy(),
                         tensors["ridge.image_mean"].numpy())
        mapping = ContrastiveMap(tensors["contrastive.weight"].numpy(),
                                 tensors["contrastive.bias"].numpy())
    except Exception as exc:  # a truncated or foreign file: the user can retrain
        raise ClipdexError(f"cannot load the prior in {weights_path} ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); run `clipdex prior train` again") from None
    return SavedExpanders(meta, prior, shift, ridge, mapping)
