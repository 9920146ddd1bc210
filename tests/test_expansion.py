"""Query expansion (issue 6): the diffusion prior, the baselines, pixel expansion and their errors.

A small generated library (tiny model) is indexed and captioned once per module; the prior is
trained on it through the real `clipdex prior train`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from index import Library, ModelMismatch
from index.synthetic.scenes import caption_for, generate, write_scenes
from retrieval import Searcher
from retrieval.expansion import (
    DEFAULT_METHOD,
    ContrastiveMap,
    Expansion,
    MeanShift,
    RidgeMap,
    interpolate,
    load_expanders,
    reciprocal_rank_fusion,
    training_pairs,
)
from retrieval.expansion.contrastive import ContrastiveConfig

SCENES, SEED, QUERY = 160, 5, "a photo of a red circle"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library of 160 scenes with 240 linked captions and a prior trained on them."""
    root = tmp_path_factory.mktemp("expansion")
    photos = root / "photos"
    rows = write_scenes(photos, SCENES, seed=SEED, size=64)
    scenes = generate(SCENES, seed=SEED)
    extra = [json.dumps({"path": rows[i][0], "caption": caption_for(scenes[i], i + 1)})
             for i in range(0, SCENES, 2)]
    (photos / "extra.jsonl").write_text("\n".join(extra) + "\n")
    home = root / "home"
    with Library.open(home) as library:
        library.index([photos], model="tiny")
        library.add_captions(photos / "captions.jsonl")
        library.add_captions(photos / "extra.jsonl")
    result = CliRunner().invoke(cli.main, ["--home", str(home), "prior", "train", "--steps",
                                           "120", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert "fewer than 1000 caption–image pairs" in result.stderr  # 240: a small library
    report = json.loads(result.stdout)
    assert report["pairs"] == SCENES + SCENES // 2 and report["images"] == SCENES
    assert report["steps"] == 120 and np.isfinite(report["final_loss"])
    # one step per pair, at least 300 (240 pairs)
    assert report["contrastive_steps"] == 300 and np.isfinite(report["contrastive_loss"])
    return home


@pytest.fixture()
def searcher(trained: Path):
    s = Searcher.open(trained)
    yield s
    s.close()


def test_prior_is_saved_with_the_library_and_loads(trained: Path, searcher: Searcher) -> None:
    meta = json.loads((trained / "prior.json").read_text())
    assert (trained / "prior.safetensors").stat().st_size > 10_000
    assert meta["model"] == "tiny" and meta["dim"] == 128 and meta["pairs"] == 240
    assert meta["train"]["seed"] == 1 and meta["prior"]["hidden"] >= 128
    saved = load_expanders(searcher.library)
    assert saved is not None and saved.prior.config.dim == 128
    samples = saved.prior.sample(np.eye(128, dtype=np.float32)[0], samples=3, seed=0)
    assert samples.shape == (3, 128)
    assert np.allclose(np.linalg.norm(samples, axis=1), 1.0, atol=1e-5)


def test_prior_round_trips_through_its_tensors(trained: Path, searcher: Searcher) -> None:
    from retrieval.expansion.prior import DiffusionPrior, TrainConfig, train_diffusion_prior

    pairs = training_pairs(searcher.library)
    prior, stats = train_diffusion_prior(pairs.text_vectors, pairs.image_vectors,
                                         train=TrainConfig(steps=20))
    again = DiffusionPrior.from_tensors(prior.config, prior.tensors())
    text = pairs.text_vectors[:2]
    assert stats.steps == 20 and stats.pairs == 240
    assert np.array_equal(prior.sample(text, samples=2, seed=3),
                          again.sample(text, samples=2, seed=3))


def test_sampling_is_deterministic_with_a_seed(searcher: Searcher) -> None:
    prior = load_expanders(searcher.library).prior
    text = searcher.query_vector([_text(QUERY)])[0]
    first = prior.sample(text, samples=4, seed=7)
    assert np.array_equal(first, prior.sample(text, samples=4, seed=7))
    assert not np.allclose(first, prior.sample(text, samples=4, seed=8))
    assert not np.allclose(first[0], first[1])  # K samples differ from one another
    guided = prior.sample(text, samples=4, seed=7, guidance=2.0)
    assert guided.shape == first.shape and not np.allclose(guided, first)


def _text(value: str):
    from retrieval import Term

    return Term("text", value, 1.0)


def test_prior_samples_lean_towards_the_image_side(searcher: Searcher) -> None:
    pairs = training_pairs(searcher.library)
    prior = load_expanders(searcher.library).prior
    samples = prior.sample(pairs.text_vectors[:40], samples=2, seed=0)
    image_centre = pairs.image_vectors.mean(0)
    # samples resemble images more than the texts they came from do
    assert (samples @ image_centre).mean() > (pairs.text_vectors[:40] @ image_centre).mean()


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def test_expansion_changes_the_query_vector_and_the_results(searcher: Searcher) -> None:
    """Each expanded search equals an exact search with the expanded vector computed here,
    q = normalise(0.1·t + 0.9·normalise(mean(sᵢ))), and q sits nearer the images than t."""
    saved = load_expanders(searcher.library)
    pairs = training_pairs(searcher.library)
    ids, images = (np.concatenate(part) for part in
                   zip(*searcher.library.store.iter_vectors("image")))
    image_centre = _unit_rows(images.mean(0))
    text = searcher.query_vector([_text(QUERY)])[0]
    prior = Expansion("prior")
    image_side = {  # sᵢ for each method, from the saved fits (meanshift from the pairs here)
        "contrastive": saved.contrastive.map(text[None, :]),
        "prior": saved.prior.sample(text, samples=prior.k, seed=0, steps=prior.denoise_steps),
        "meanshift": _unit_rows(text + (pairs.image_vectors.mean(0)
                                        - pairs.text_vectors.mean(0)))[None, :],
        "ridge": saved.ridge.map(text[None, :]),
    }
    plain = searcher.search(QUERY, k=10)
    assert [h.score for h in plain.hits] == pytest.approx(
        [float(text @ images[ids == h.id][0]) for h in plain.hits], abs=1e-5)
    for method, samples in image_side.items():
        result = searcher.search(QUERY, k=10, expand=Expansion(method, weight=0.9))
        assert result.query.expand == method and len(result.hits) == 10
        assert "expand" in result.timings_ms
        expanded = _unit_rows(0.1 * text + 0.9 * _unit_rows(samples.mean(0)))
        assert expanded @ image_centre > text @ image_centre + 0.05, method
        scores = images @ expanded
        best = np.argsort(-scores, kind="stable")[:10]
        assert [h.id for h in result.hits] == ids[best].tolist(), method
        assert [h.score for h in result.hits] == pytest.approx(scores[best].tolist(), abs=1e-5)
        assert [h.id for h in result.hits] != [h.id for h in plain.hits], method
    none = searcher.search(QUERY, k=10, expand=Expansion("prior", weight=0.0))
    assert [h.id for h in none.hits] == [h.id for h in plain.hits]
    assert [h.score for h in none.hits] == pytest.approx([h.score for h in plain.hits], abs=1e-6)


def test_interpolation_and_rank_fusion() -> None:
    text = np.array([1.0, 0.0, 0.0], np.float32)
    samples = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    assert np.allclose(interpolate(text, samples, 0.0), text)
    half = interpolate(text, samples, 0.5)
    assert np.isclose(np.linalg.norm(half), 1.0) and half[0] > 0 and half[1] == half[2] > 0
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 2, 1], [3, 1]], [0.5, 0.25, 0.25])
    assert [item for item, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(0.5 / 61 + 0.25 / 63 + 0.25 / 62)


def test_meanshift_and_ridge_move_texts_towards_their_images(searcher: Searcher) -> None:
    pairs = training_pairs(searcher.library)
    texts, images = pairs.text_vectors, pairs.image_vectors
    shift = MeanShift.fit(texts, images)
    assert np.allclose(shift.delta, images.mean(0) - texts.mean(0), atol=1e-6)
    ridge = RidgeMap.fit(texts, images)
    before = np.mean(np.sum(texts * images, axis=1))
    for mapper in (shift, ridge):
        mapped = mapper.map(texts)
        assert np.allclose(np.linalg.norm(mapped, axis=1), 1.0, atol=1e-5)
        assert np.mean(np.sum(mapped * images, axis=1)) > before + 0.01, type(mapper).__name__
    saved = load_expanders(searcher.library)  # `prior train` saved the same fits
    assert np.allclose(saved.meanshift.delta, shift.delta, atol=1e-5)
    assert np.allclose(saved.ridge.weight, ridge.weight, atol=1e-4)


def _own_image_r1(pairs, queries: np.ndarray) -> float:
    """Share of captions whose own image scores highest among the library's images."""
    ids, first, own = np.unique(pairs.image_ids, return_index=True, return_inverse=True)
    scores = queries @ pairs.image_vectors[first].T
    return float(np.mean(scores.argmax(1) == own.reshape(-1)))


def test_contrastive_map_ranks_each_caption_own_image_first_more_often(
        searcher: Searcher) -> None:
    pairs = training_pairs(searcher.library)
    saved = load_expanders(searcher.library).contrastive  # what `prior train` fitted
    mapped = saved.map(pairs.text_vectors)
    assert np.allclose(np.linalg.norm(mapped, axis=1), 1.0, atol=1e-5)
    plain = _own_image_r1(pairs, pairs.text_vectors)
    # on the pairs it learnt from, at least half of the misses go (measured: 0.904 → 0.975)
    assert _own_image_r1(pairs, mapped) > plain + 0.5 * (1 - plain), plain
    # the same seed gives the same map; sampled negatives (fewer than the images) train too
    again, stats = ContrastiveMap.fit(pairs, config=ContrastiveConfig())
    assert np.allclose(again.weight, saved.weight, atol=1e-4)
    sampled, stats = ContrastiveMap.fit(pairs, config=ContrastiveConfig(steps=200, negatives=32))
    assert stats.steps == 200 and np.isfinite(stats.final_loss)
    assert _own_image_r1(pairs, sampled.map(pairs.text_vectors)) > plain


def test_cli_search_with_each_expansion(trained: Path) -> None:
    base = ("--home", trained, "search", QUERY, "--top", "5", "--json")
    code, out = _run(*base)
    assert code == 0, out
    plain = json.loads(out)
    assert plain["query"]["expand"] is None
    runs = {"default": ["--expand"], "ridge": ["--expand", "ridge", "--expand-weight", "0.9"],
            "rrf": ["--expand", "prior", "--expand-fusion", "rrf", "--expand-samples", "2",
                    "--expand-seed", "3"]}
    results = {}
    for name, extra in runs.items():
        code, out = _run(*base, *extra)
        assert code == 0, (name, out)
        results[name] = json.loads(out)
        assert len(results[name]["hits"]) == 5
    assert results["default"]["query"]["expand"] == DEFAULT_METHOD  # cli.py spells it out too
    assert [h["id"] for h in results["ridge"]["hits"]] != [h["id"] for h in plain["hits"]]
    scores = [h["score"] for h in results["rrf"]["hits"]]
    assert scores == sorted(scores, reverse=True) and scores[0] < 0.05  # RRF scores, not cosines
    code, again = _run(*base, *runs["rrf"])
    assert json.loads(again) == results["rrf"]  # the same seed gives the same answer


@pytest.mark.parametrize("args, code, words", [
    (["search", QUERY, "--expand-weight", "0.5"], 2, "need(s) --expand"),
    (["search", QUERY, "--expand", "pixels"], 2, "--generator"),
    (["search", QUERY, "--expand", "ridge", "--generator", "x"], 2, "only applies"),
    (["search", QUERY, "--expand", "ridge", "--target", "captions"], 2, "--target images"),
    (["search", "--image", "IMAGE", "--expand", "ridge"], 2, "needs a query text"),
    (["search", QUERY, "--expand", "pixels", "--generator", "/no/such/generator"], 1,
     "cannot load the image generator"),
])
def test_cli_errors_are_one_clear_message(trained: Path, args: list[str], code: int,
                                          words: str) -> None:
    image = next((trained.parent / "photos").glob("*.png"))
    args = [str(image) if a == "IMAGE" else a for a in args]
    got, out = _run("--home", trained, *args)
    assert got == code and words in out, out


def test_prior_before_training_and_a_broken_prior(trained: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained, home, ignore=shutil.ignore_patterns("prior.*"))
    for method in ("prior", "contrastive"):
        code, out = _run("--home", home, "search", QUERY, "--expand", method)
        assert code == 1 and "clipdex prior train" in out and method in out, out
    code, out = _run("--home", home, "search", QUERY, "--expand")  # the default needs it too
    assert code == 1 and "clipdex prior train" in out, out
    code, out = _run("--home", home, "search", QUERY, "--expand", "meanshift", "--json")
    assert code == 0 and json.loads(out)["query"]["expand"] == "meanshift"  # fitted on the fly
    shutil.copy(trained / "prior.json", home / "prior.json")
    (home / "prior.safetensors").write_bytes(b"not a safetensors file")
    code, out = _run("--home", home, "search", QUERY, "--expand", "prior")
    assert code == 1 and "prior train` again" in out, out


def test_training_needs_linked_pairs(tmp_path: Path) -> None:
    code, out = _run("--home", tmp_path / "empty", "prior", "train")
    assert code == 1 and "empty" in out, out
    photos = tmp_path / "photos"
    write_scenes(photos, 4, size=64)
    with Library.open(tmp_path / "uncaptioned") as library:
        library.index([photos], model="tiny")
    code, out = _run("--home", tmp_path / "uncaptioned", "prior", "train", "--steps", "5")
    assert code == 1 and "no captions linked to indexed images" in out, out
    code, out = _run("--home", tmp_path / "uncaptioned", "search", QUERY, "--expand", "ridge")
    assert code == 1 and "no captions linked" in out, out


def test_a_prior_from_another_model_is_refused(trained: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    with Library.open(other) as library:
        library.store.claim_model("ViT-B-32:random", 512, "resize 224")
        shutil.copy(trained / "prior.json", other / "prior.json")
        shutil.copy(trained / "prior.safetensors", other / "prior.safetensors")
        with pytest.raises(ModelMismatch, match="trained for model 'tiny'"):
            load_expanders(library)
    code, out = _run("--home", other, "search", QUERY, "--expand", "prior")
    assert code == 1 and "trained for model 'tiny'" in out and "prior train" in out, out


def test_pixels_without_diffusers_names_the_extra(trained: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers → ImportError
    code, out = _run("--home", trained, "search", QUERY, "--expand", "pixels", "--generator",
                     "some/model")
    assert code == 1 and "pip install 'clipdex[diffusion]'" in out, out


# --- pixel-space expansion with a tiny random diffusers pipeline ------------------------------
def _tiny_pipeline(folder: Path) -> Path:
    """A randomly initialised Stable Diffusion pipeline a few kB big, built offline."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers", reason="needs the `diffusion` extra")
    transformers = pytest.importorskip("transformers", reason="needs the `diffusion` extra")
    folder.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in letters:  # single characters and word-final characters: no merges needed
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"),
                                           str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=16))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, layers_per_block=1, sample_size=16)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="linear",
                                        clip_sample=False, steps_offset=1)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def test_pixel_expansion_with_a_saved_pipeline(trained: Path, tmp_path: Path,
                                               searcher: Searcher) -> None:
    generator = _tiny_pipeline(tmp_path / "generator")
    args = ("--home", trained, "search", QUERY, "--expand", "pixels", "--generator", generator,
            "--expand-samples", "2", "--expand-steps", "2", "--expand-weight", "0.9", "--json")
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    import torch

    # the CPU warning, and only where there is no GPU (this test ran on an H200 too)
    assert ("generating images on the CPU" in result.stderr) != torch.cuda.is_available()
    hits = json.loads(result.stdout)["hits"]
    plain = searcher.search(QUERY, k=10).hits
    assert len(hits) == 10 and [h["id"] for h in hits] != [h.id for h in plain]

    from retrieval.expansion.pixels import PixelExpander

    expander = PixelExpander.load(str(generator), searcher.embedder)
    text = searcher.query_vector([_text(QUERY)])[0]
    spec = Expansion("pixels", generator=str(generator), samples=2, steps=2, seed=4)
    vectors = expander.image_vectors(text, [QUERY], spec)
    assert vectors.shape == (2, 128) and not np.allclose(vectors[0], vectors[1])
    assert np.array_equal(vectors, expander.image_vectors(text, [QUERY], spec))
