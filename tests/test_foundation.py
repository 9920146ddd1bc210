"""The package's foundation: CLI start-up, the embedder on the tiny model, the scene generator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from index.clip import ClipEmbedder, resolve_spec
from index.errors import ModelUnavailable, UsageProblem
from index.synthetic import scenes

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "faiss", "PIL", "sqlalchemy", "numpy", "fastapi")


@pytest.mark.parametrize("args", [["--help"], ["search", "--help"], ["index", "--help"],
                                  ["captions", "add", "--help"], ["--version"]])
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    code = (
        "import sys, cli\n"
        "from click.testing import CliRunner\n"
        f"r = CliRunner().invoke(cli.main, {args!r})\n"
        "assert r.exit_code == 0, r.output\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(r.output[:40].replace(chr(10), ' '), heavy)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


def test_version_and_help_text() -> None:
    runner = CliRunner()
    assert "clipdex, version" in runner.invoke(cli.main, ["--version"]).output
    text = runner.invoke(cli.main, ["search", "--help"]).output
    assert "normalise(Σ wᵢ·vᵢ)" in text and "--target" in text


def test_embedder_shapes_and_normalisation(tiny_embedder: ClipEmbedder) -> None:
    images = [scenes.render(s, 96) for s in scenes.generate(5, seed=1)]
    vectors = tiny_embedder.encode_images(images)
    texts = tiny_embedder.encode_texts(["a red circle", "two blue stars", "x"])
    assert vectors.shape == (5, tiny_embedder.dim) and vectors.dtype == np.float32
    assert texts.shape == (3, tiny_embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert tiny_embedder.encode_texts([]).shape == (0, tiny_embedder.dim)


def test_batching_equals_one_by_one() -> None:
    # on the CPU: a GPU's kernels may differ by batch size beyond this tolerance (5e-5 seen)
    embedder = ClipEmbedder.load("tiny", device="cpu", precision="fp32")
    images = [scenes.render(s, 80) for s in scenes.generate(7, seed=2)]
    batched = embedder.encode_images(images, batch_size=4)
    single = np.concatenate([embedder.encode_images([im]) for im in images])
    np.testing.assert_allclose(batched, single, atol=2e-5)
    texts = ["a photo of a green square", "three small stars", "a ring"]
    np.testing.assert_allclose(embedder.encode_texts(texts, batch_size=2),
                               np.concatenate([embedder.encode_texts([t]) for t in texts]),
                               atol=2e-5)


def test_precisions_agree_with_fp32() -> None:
    images = [scenes.render(s, 96) for s in scenes.generate(16, seed=3)]
    texts = [scenes.caption_for(s, i) for i, s in enumerate(scenes.generate(16, seed=3))]
    fp32 = ClipEmbedder.load("tiny", device="cpu", precision="fp32")
    reference, reference_text = fp32.encode_images(images), fp32.encode_texts(texts)
    for precision in ("bf16", "int8"):  # int8 runs on the CPU only
        other = ClipEmbedder.load("tiny", device="cpu", precision=precision)
        cosine = (reference * other.encode_images(images)).sum(axis=1)
        assert cosine.min() > 0.98, (precision, cosine.min())
        cosine = (reference_text * other.encode_texts(texts)).sum(axis=1)
        assert cosine.min() > 0.98, (precision, "text", cosine.min())


INT8_ENGINES = {"x86", "fbgemm", "onednn"}  # the engines dynamic int8 Linear runs on


def _has_int8_engine() -> bool:
    import torch

    return bool(INT8_ENGINES & set(torch.backends.quantized.supported_engines))


def _without_int8_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch report only qnnpack (as on a build without fbgemm/onednn)."""
    import torch

    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines",
                        property(lambda _: ["qnnpack"]))


def test_auto_precision_on_cpu_keeps_int8_only_where_it_matches_fp32(monkeypatch) -> None:
    import index.precision as precision_module

    auto = ClipEmbedder.load("tiny", device="cpu")  # precision="auto"
    if _has_int8_engine():  # the probe runs, and the tiny model's int8 towers pass it
        assert set(auto.int8_probe_cosine) == {"image", "text"}
        assert min(auto.int8_probe_cosine.values()) >= precision_module.INT8_MIN_COSINE
        assert auto.precision == "int8"
    else:  # nothing to quantise with: no probe, fp32
        assert (auto.precision, auto.int8_probe_cosine) == ("fp32", {})
    texts = ["red circle", "three small green stars"]
    fp32_texts = ClipEmbedder.load("tiny", device="cpu", precision="fp32").encode_texts(texts)
    with monkeypatch.context() as patched:
        patched.setattr(precision_module, "INT8_MIN_COSINE", 1.01)  # nothing can pass
        strict = ClipEmbedder.load("tiny", device="cpu")
    assert strict.precision == "fp32"
    if _has_int8_engine():
        assert set(strict.int8_probe_cosine) == {"image", "text"}  # probed, and refused
    np.testing.assert_allclose(strict.encode_texts(texts), fp32_texts, atol=1e-6)


def test_auto_precision_without_an_int8_engine_is_fp32(monkeypatch) -> None:
    _without_int8_engines(monkeypatch)
    assert not _has_int8_engine()
    auto = ClipEmbedder.load("tiny", device="cpu")
    assert (auto.precision, auto.int8_probe_cosine) == ("fp32", {})
    texts = ["red circle", "two blue stars"]
    fp32 = ClipEmbedder.load("tiny", device="cpu", precision="fp32")
    np.testing.assert_allclose(auto.encode_texts(texts), fp32.encode_texts(texts), atol=1e-6)


def test_trimmed_text_encoding_equals_open_clips_full_context() -> None:
    """Texts stop at their end-of-text token; padding after it must not matter."""
    import torch

    from index.clip import encode_text_trimmed

    embedder = ClipEmbedder.load("tiny", device="cpu", precision="fp32")
    texts = ["red circle", "wow! a very small green star!", "",  # "!" is token id 0
             " ".join(["a large blue hexagon"] * 20)]  # longer than the context: truncated
    tokens = embedder.tokenizer(texts)
    with torch.inference_mode():
        full = embedder.model.encode_text(tokens)
        torch.testing.assert_close(encode_text_trimmed(embedder.model, tokens), full,
                                   atol=1e-5, rtol=1e-4)
        one = encode_text_trimmed(embedder.model, tokens[:1])  # trimmed to 4 positions
        torch.testing.assert_close(one, full[:1], atol=1e-5, rtol=1e-4)
    batched = embedder.encode_texts(texts, batch_size=2)  # sorted by length, then put back
    expected = torch.nn.functional.normalize(full, dim=-1).numpy()
    np.testing.assert_allclose(batched, expected, atol=1e-5)


def test_split_attention_is_exact_and_handles_masks() -> None:
    """The int8 path swaps nn.MultiheadAttention for plain-Linear attention: same outputs."""
    import copy

    import torch

    from index.precision import split_attention

    model = ClipEmbedder.load("tiny", device="cpu", precision="fp32").model
    split = copy.deepcopy(model)
    split_attention(split)
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in split.modules())
    tokens = ClipEmbedder.load("tiny", device="cpu", precision="fp32").tokenizer(
        ["red circle", "two blue stars"])
    with torch.inference_mode():  # the text tower uses a causal float mask
        torch.testing.assert_close(split.encode_text(tokens), model.encode_text(tokens),
                                   atol=1e-5, rtol=1e-4)
        mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
        holder = torch.nn.Sequential(mha)
        split_attention(holder)
        x = torch.randn(3, 5, 16)
        mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # True = masked out
        torch.testing.assert_close(holder[0](x, x, x, need_weights=False, attn_mask=mask)[0],
                                   mha(x, x, x, need_weights=False, attn_mask=mask)[0],
                                   atol=1e-5, rtol=1e-4)


def test_tiny_loads_through_open_clip_local_dir() -> None:
    source = resolve_spec("tiny")
    assert source.name.startswith("local-dir:") and source.pretrained is None
    assert (Path(source.name.removeprefix("local-dir:")) / "open_clip_model.safetensors").is_file()


def test_failed_download_names_the_offline_model() -> None:
    with pytest.raises(ModelUnavailable) as info:
        ClipEmbedder.load("ViT-B-32:laion2b_s34b_b79k")
    assert "--model tiny" in str(info.value) and "could not be downloaded" in str(info.value)


def test_failed_download_via_cli_has_no_traceback(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    scenes.write_scenes(folder, 2, size=32)
    result = CliRunner().invoke(cli.main, ["--home", str(tmp_path / "h"), "index", str(folder),
                                           "--model", "ViT-B-32:laion2b_s34b_b79k"])
    assert result.exit_code == 1
    assert "--model tiny" in result.output and "Traceback" not in result.output


def test_bad_model_specs() -> None:
    with pytest.raises(ModelUnavailable, match="unknown model"):
        resolve_spec("NoSuchNet:foo")
    with pytest.raises(UsageProblem, match="pretrained tag"):
        resolve_spec("ViT-B-32")
    with pytest.raises(UsageProblem, match="precision"):
        ClipEmbedder.load("tiny", precision="fp8")


def test_scenes_are_deterministic(tmp_path: Path) -> None:
    first = scenes.write_scenes(tmp_path / "a", 12, seed=5, size=48)
    second = scenes.write_scenes(tmp_path / "b", 12, seed=5, size=48)
    other = scenes.write_scenes(tmp_path / "c", 12, seed=6, size=48)
    assert first == second and first != other
    for name, _ in first:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    suffixes = {Path(name).suffix for name, _ in first}
    assert suffixes == {".jpg", ".png"}
    lines = [json.loads(line) for line in (tmp_path / "a" / "captions.jsonl").open()]
    assert [(d["path"], d["caption"]) for d in lines] == first
    csv_lines = (tmp_path / "a" / "captions.csv").read_text().splitlines()
    assert csv_lines[0] == "path,caption" and len(csv_lines) == 13


def test_scene_vocabulary_and_holdout() -> None:
    assert len(scenes.SHAPES) >= 8 and len(scenes.COLOURS) >= 8
    drawn = scenes.generate(2000, seed=9, exclude=scenes.HOLDOUT)
    assert not {(s.colour, s.shape) for s in drawn} & scenes.HOLDOUT
    assert {s.count for s in drawn} == {1, 2, 3}
    assert {s.background for s in drawn} == set(scenes.BACKGROUND_KINDS)
    captions = {scenes.caption_for(s, i) for i, s in enumerate(drawn[:50])}
    assert len(captions) == 50
    everything = scenes.generate(3000, seed=9)
    assert {(s.colour, s.shape) for s in everything} >= scenes.HOLDOUT


def test_scenes_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.main, ["scenes", str(tmp_path / "s"), "--count", "4",
                                           "--seed", "1", "--size", "40"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "s").glob("scene_*"))) == 4


def test_prepare_and_collate_equal_preprocess_bit_for_bit() -> None:
    """Decode threads run the PIL steps; the batch's ToTensor + Normalize run at once."""
    import torch

    embedder = ClipEmbedder.load("tiny", device="cpu", precision="fp32")
    images = [scenes.render(s, 150) for s in scenes.generate(5, seed=4)]
    images += [images[0].convert("L"), images[1].convert("RGBA"), images[2].convert("P")]
    prepared = [embedder.prepare(im) for im in images]
    assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 for p in prepared)
    expected = torch.stack([embedder.preprocess(im) for im in images])
    assert torch.equal(embedder.collate(prepared), expected)
    mixed = [prepared[0], embedder.preprocess(images[1]), prepared[2]]  # some fell back
    assert torch.equal(embedder.collate(mixed), expected[:3])
    # a preprocess of another shape falls back to the whole transform, image by image
    other = ClipEmbedder.load("tiny", device="cpu", precision="fp32")
    other.preprocess = lambda im: torch.full((3, 4, 4), float(im.size[0]))
    assert isinstance(other.prepare(images[0]), torch.Tensor)
    assert torch.equal(other.collate([other.prepare(im) for im in images[:2]]),
                       torch.full((2, 3, 4, 4), 150.0))
