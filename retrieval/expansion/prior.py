"""A diffusion prior: CLIP image embeddings sampled from a CLIP text embedding (DALL·E 2 style).

CLIP puts texts and images in different regions of the shared space (the modality gap), so a
text query lands beside, not among, the images it describes. The prior learns p(image vector |
text vector) from the library's own caption–image pairs; its samples are image-side vectors a
text query can be fused with before searching (see expansion.py).

The model is deliberately small: an MLP denoiser with a sinusoidal timestep embedding predicts
the clean embedding x0 from a noised one (cosine noise schedule), with the text condition
dropped for a share of training steps so classifier-free guidance works at sampling time.
Embeddings are standardised per dimension (unit vectors have tiny coordinates) and sampled with
deterministic DDIM in a few steps, which keeps a query's added latency to milliseconds on a CPU.
This module imports torch at the top: import it lazily.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["DiffusionPrior", "PriorConfig", "TrainConfig", "TrainStats", "train_diffusion_prior"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PriorConfig:
    """The network and noise schedule; saved beside the weights."""

    dim: int
    hidden: int = 512
    blocks: int = 4
    timesteps: int = 1000
    cond_drop: float = 0.1  # share of training steps without the text: enables guidance

    @classmethod
    def for_dim(cls, dim: int) -> "PriorConfig":
        # 2×dim wide, within [256, 512]: 256 for the tiny model, 512 for ViT-B-32 (wider
        # trains for far longer than "minutes on 2 cores" and samples past 20 ms a query)
        return cls(dim=dim, hidden=int(min(512, max(256, 2 * dim))))


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # None: from epochs
    epochs: float = 40.0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # A step costs ~44 ms with the tiny model (128-d, 256 wide) and ~110 ms at 512-d on 2
    # cores, whatever the pairs: the 6000-step cap (≥ 38k pairs at 40 epochs) is 4-11 min.
    # The floor was 300 steps until 2026-11-28 (256 epochs of 300 pairs, 8-31 s). Trained on
    # the 300 pairs of 300 scenes, test R@1 on 300 other scenes (none: 0.787), A = 0.4, two
    # seeds: 50 steps 0.767 / 0.770, 100 0.780 / 0.773, 150 0.790 / 0.787, 300 0.780 / 0.783.
    # So 150: as good as 300 there, in half the time; no gain over no expansion either way.
    min_steps: int = 150
    max_steps: int = 6000

    def total_steps(self, pairs: int) -> int:
        if self.steps is not None:
            return self.steps
        wanted = math.ceil(self.epochs * pairs / self.batch_size)
        return int(min(self.max_steps, max(self.min_steps, wanted)))


@dataclass(frozen=True)
class TrainStats:
    steps: int
    pairs: int
    seconds: float
    final_loss: float
    losses: tuple[float, ...] = field(default=(), repr=False)


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ(t) of the cosine schedule (Nichol & Dhariwal 2021), t = 0..T, clipped away from 0."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = (f / f[0]).clamp(min=1e-5, max=1.0)
    return alpha_bar[1:].float()  # index t-1 ↔ step t; ᾱ at the last step is ~1e-5 (pure noise)


def timestep_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    half = width // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class _Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)
        self.scale_shift = nn.Linear(hidden, 2 * hidden)  # FiLM from the timestep

    def forward(self, h: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, shift = film
        x = self.norm(h) * (1 + scale) + shift
        return h + self.down(nn.functional.silu(self.up(x)))


class Denoiser(nn.Module):
    """x0 = f(x_t, t, text): predicts the clean (standardised) image embedding.

    The text enters with x_t at the input and rides the residual stream; the timestep modulates
    every block (FiLM). Depending on t alone, the modulations of a sampling schedule are
    computed once and reused for every query: sampling is memory-bound on a CPU, so each
    weight matrix not read per step is time saved.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        d, h = config.dim, config.hidden
        self.config = config
        self.time = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU())
        self.null_cond = nn.Parameter(torch.zeros(d))  # the "no text" condition for guidance
        self.inp = nn.Linear(2 * d, h)
        self.blocks = nn.ModuleList(_Block(h) for _ in range(config.blocks))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, d))

    def films(self, t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's (scale, shift) for timesteps t."""
        context = self.time(timestep_embedding(t, self.config.hidden))
        return [tuple(block.scale_shift(context).chunk(2, dim=1)) for block in self.blocks]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                films: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        films = self.films(t) if films is None else films
        h = self.inp(torch.cat([x_t, text], dim=1))
        for block, film in zip(self.blocks, films):
            h = block(h, film)
        return self.out(h)


class DiffusionPrior:
    """A trained prior plus the standardisation of its inputs and outputs.

    Args:
        config: the network and schedule.
        denoiser: the network (weights loaded).
        stats: per-dimension mean/std of the training text and image vectors.
    """

    def __init__(self, config: PriorConfig, denoiser: Denoiser,
                 stats: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.denoiser = denoiser.eval()
        self.stats = stats
        self.alpha_bar = cosine_alpha_bar(config.timesteps)
        self._film_cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # --- sampling ---------------------------------------------------------------------------
    def sample(self, text_vectors: np.ndarray, *, samples: int = 4, seed: int = 0,
               steps: int = 16, guidance: float = 1.0) -> np.ndarray:
        """Sample image embeddings for each text vector.

        Args:
            text_vectors: N×dim unit text embeddings (or one dim-vector).
            samples: K samples per text.
            seed: the same seed, inputs and thread count give the same samples.
            steps: DDIM steps (deterministic, eta = 0).
            guidance: classifier-free guidance scale (1 = conditional model only).
        Returns:
            N×K×dim float32 unit vectors (K×dim for one input vector).
        """
        with torch.inference_mode(), _one_thread():
            return self._sample(text_vectors, samples, seed, steps, guidance)

    def _sample(self, text_vectors: np.ndarray, samples: int, seed: int, steps: int,
                guidance: float) -> np.ndarray:
        single = np.ndim(text_vectors) == 1
        texts = torch.as_tensor(np.atleast_2d(text_vectors), dtype=torch.float32)
        cond = self._standardise(texts, "text").repeat_interleave(samples, dim=0)
        generator = torch.Generator().manual_seed(int(seed))
        x = torch.randn(cond.shape, generator=generator)
        for t, t_prev in _ddim_pairs(self.config.timesteps, steps):
            x0 = self._predict(x, t, cond, guidance)
            if t_prev == 0:
                x = x0
                break
            ab, ab_prev = self.alpha_bar[t - 1], self.alpha_bar[t_prev - 1]
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        images = nn.functional.normalize(x * self.stats["image_std"] + self.stats["image_mean"],
                                         dim=1)
        out = images.numpy().astype(np.float32).reshape(len(texts), samples, -1)
        return out[0] if single else out

    def _predict(self, x: torch.Tensor, t: int, cond: torch.Tensor,
                 guidance: float) -> torch.Tensor:
        films = self._films(t)  # 1-row tensors: broadcast over the batch
        if guidance == 1.0:
            return self.denoiser(x, None, cond, films)  # type: ignore[arg-type]
        null = self.denoiser.null_cond.expand_as(cond)
        both = self.denoiser(torch.cat([x, x]), None, torch.cat([cond, null]), films)
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def _films(self, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if t not in self._film_cache:
            self._film_cache[t] = self.denoiser.films(torch.tensor([t]))
        return self._film_cache[t]

    def _standardise(self, vectors: torch.Tensor, kind: str) -> torch.Tensor:
        return (vectors - self.stats[f"{kind}_mean"]) / self.stats[f"{kind}_std"]

    # --- files ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"denoiser.{k}": v.detach().contiguous()
               for k, v in self.denoiser.state_dict().items()}
        out.update({f"stats.{k}": v.contiguous() for k, v in self.stats.items()})
        return out

    @classmethod
    def from_tensors(cls, config: PriorConfig, tensors: dict[str, torch.Tensor]
                     ) -> "DiffusionPrior":
        denoiser = Denoiser(config)
        denoiser.load_state_dict({k.removeprefix("denoiser."): v for k, v in tensors.items()
                                  if k.startswith("denoiser.")})
        stats = {k.removeprefix("stats."): v for k, v in tensors.items()
                 if k.startswith("stats.")}
        return cls(config, denoiser, stats)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Sample on one thread: the batches are a few rows, so a second thread gains ~1 ms, and on
    a busy machine waiting for it to be scheduled costs tens (measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ddim_pairs(timesteps: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_prev) from T down to 0 in `steps` evenly spaced jumps."""
    steps = max(1, min(steps, timesteps))
    grid = np.linspace(timesteps, 0, steps + 1).round().astype(int).tolist()
    return list(zip(grid[:-1], grid[1:]))


# --- training ---------------------------------------------------------------------------------
def _stats(text_vectors: torch.Tensor, image_vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "text_mean": text_vectors.mean(0), "text_std": text_vectors.std(0).clamp(min=1e-4),
        "image_mean": image_vectors.mean(0), "image_std": image_vectors.std(0).clamp(min=1e-4),
    }


def train_diffusion_prior(text_vectors: np.ndarray, image_vectors: np.ndarray, *,
                          config: PriorConfig | None = None, train: TrainConfig = TrainConfig(),
                          progress: Callable[[int, int, float], None] | None = None
                          ) -> tuple[DiffusionPrior, TrainStats]:
    """Train a prior on paired unit vectors (row i of each belongs together).

    Args:
        text_vectors, image_vectors: N×dim float32.
        config: the network (default: sized for the dimension).
        train: steps or epochs, batch size, learning rate, seed.
        progress: called as progress(done, total, loss) every few steps.
    Returns:
        The trained prior and what the training did.
    """
    texts = torch.as_tensor(np.ascontiguousarray(text_vectors), dtype=torch.float32)
    images = torch.as_tensor(np.ascontiguousarray(image_vectors), dtype=torch.float32)
    config = config or PriorConfig.for_dim(texts.shape[1])
    torch.manual_seed(train.seed)
    generator = torch.Generator().manual_seed(train.seed)
    stats = _stats(texts, images)
    texts = (texts - stats["text_mean"]) / stats["text_std"]
    images = (images - stats["image_mean"]) / stats["image_std"]
    denoiser = Denoiser(config)
    total = train.total_steps(len(texts))
    optimiser = torch.optim.AdamW(denoiser.parameters(), lr=train.lr,
                                  weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(total))
    alpha_bar = cosine_alpha_bar(config.timesteps)
    losses: list[float] = []
    started = time.perf_counter()
    denoiser.train()
    for step in range(total):
        batch = torch.randint(len(texts), (min(train.batch_size, len(texts)),),
                              generator=generator)
        loss = _loss(denoiser, texts[batch], images[batch], alpha_bar, config, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if progress and (step % 10 == 9 or step == total - 1):
            progress(step + 1, total, float(np.mean(losses[-50:])))
    seconds = time.perf_counter() - started
    prior = DiffusionPrior(config, denoiser, stats)
    final = float(np.mean(losses[-50:])) if losses else float("nan")
    return prior, TrainStats(total, len(texts), seconds, final, tuple(losses))


def _warmup_cosine(total: int) -> Callable[[int], float]:
    """Learning-rate factor: a short linear warm-up, then a cosine decay to zero."""
    warmup = max(1, min(100, total // 20))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def _loss(denoiser: Denoiser, cond: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor,
          config: PriorConfig, generator: torch.Generator) -> torch.Tensor:
    n = len(x0)
    t = torch.randint(1, config.timesteps + 1, (n,), generator=generator)
    ab = alpha_bar[t - 1][:, None]
    noise = torch.randn(x0.shape, generator=generator)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    drop = torch.rand(n, generator=generator) < config.cond_drop
    cond = torch.where(drop[:, None], denoiser.null_cond.expand_as(cond), cond)
    return nn.functional.mse_loss(denoiser(x_t, t, cond), x0)


# --- saving -----------------------------------------------------------------------------------
def save_prior_files(weights_path: Path, meta_path: Path, tensors: dict[str, torch.Tensor],
                     meta: dict) -> None:
    """Write the weights then the JSON, each atomically; the JSON is what marks them ready."""
    from safetensors.torch import save_file

    from index.atomic import atomic_write, atomic_write_text

    atomic_write(weights_path,
                 lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")


def config_dict(config: PriorConfig) -> dict:
    return {"format": FORMAT_VERSION, **asdict(config)}


def config_from_dict(data: dict) -> PriorConfig:
    fields = {k: data[k] for k in ("dim", "hidden", "blocks", "timesteps", "cond_drop")}
    return PriorConfig(**fields)
