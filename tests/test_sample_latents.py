"""``flashvaed sample-latents``: a real (tiny, random) diffusers pipeline with a text encoder, run from
its folder with ``output_type="latent"``; the latents it writes are the ones the pipeline's VAE
decodes, in the space flashvaed's readers (``prune --calib``, ``distill -d``) expect."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from conftest import perturbed_ltx_vae
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, WanPipeline
from safetensors.torch import load_file
from test_diffusers_pipelines import ltx_transformer, wan_transformer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
from typer.testing import CliRunner

from flashvaed import api, engines
from flashvaed import sample_latents as sampling
from flashvaed.cli import app
from flashvaed.errors import InputError
from flashvaed.models import load_model
from flashvaed.prune.calibration import calibration_latents

WORDS = ["<pad>", "</s>", "<unk>", *"a cat dog surfing on the sea red blue car city at night".split()]
PROMPTS = "a cat surfing on the sea\n\n  a red car at night  \n"


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer made here (no vocabulary file to download)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def t5(cls, config_cls):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8
    )
    return cls(config).eval()


@pytest.fixture(scope="module")
def pipes(diffusers_vae_8, tmp_path_factory):
    """Pipeline folders as `save_pretrained` writes them: Wan2.1 (UMT5) and LTX-Video 0.9.1 (T5)."""
    d = tmp_path_factory.mktemp("sample")
    WanPipeline(
        tokenizer=tokenizer(),
        text_encoder=t5(UMT5EncoderModel, UMT5Config),
        vae=diffusers_vae_8,
        transformer=wan_transformer(16, 16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    ).save_pretrained(d / "wan")
    LTXPipeline(
        tokenizer=tokenizer(),
        text_encoder=t5(T5EncoderModel, T5Config),
        vae=perturbed_ltx_vae("0.9.1"),
        transformer=ltx_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    ).save_pretrained(d / "ltx")
    (d / "prompts.txt").write_text(PROMPTS)
    return d


def test_wan_latents_decode_to_the_pipelines_own_frames(pipes, tmp_path):
    """Normalised latents: flashvaed's teacher decodes them into the frames the pipeline makes."""
    files = sampling.sample_latents(
        pipes / "wan",
        pipes / "prompts.txt",
        tmp_path / "lat",
        steps=2,
        height=32,
        width=32,
        frames=9,
        seed=4,
        device="cpu",
    )
    assert [f.name for f in files] == ["0000.safetensors", "0001.safetensors"]
    record = json.loads((tmp_path / "lat" / "prompts.json").read_text())
    assert record["files"]["0001.safetensors"]["prompt"] == "a red car at night"
    assert record["files"]["0001.safetensors"]["seed"] == 5 and record["class"] == "WanPipeline"
    pipe = WanPipeline.from_pretrained(pipes / "wan")
    teacher = engines.load(pipes / "wan" / "vae")
    for i, (file, prompt) in enumerate(zip(files, ["a cat surfing on the sea", "a red car at night"], strict=True)):
        latents = load_file(str(file))["latents"]
        assert latents.shape == (1, 16, 3, 4, 4) and latents.dtype == torch.float32
        frames = pipe(
            prompt=prompt,
            num_inference_steps=2,
            height=32,
            width=32,
            num_frames=9,
            generator=torch.Generator().manual_seed(4 + i),
            output_type="pt",
        ).frames  # (B, F, C, H, W) in [0, 1]
        ours = (teacher.decode(latents).permute(0, 2, 1, 3, 4) + 1) / 2
        torch.testing.assert_close(ours, frames, atol=1e-4, rtol=0)


def test_ltx_latents_are_unpacked_and_calibrate_a_prune(pipes, diffusers_dir_8, tmp_path):
    lat = tmp_path / "ltx-latents"
    sampling.sample_latents(pipes / "ltx", ["a dog", "a blue car"], lat, steps=2, height=64, width=64, frames=17)
    latents = load_file(str(lat / "0000.safetensors"))["latents"]
    assert latents.shape == (1, 8, 3, 2, 2)  # (1, z, T, h, w), not LTX's (1, tokens, z)
    read = calibration_latents(lat, load_model(pipes / "ltx" / "vae"))
    assert [tuple(z.shape) for z in read] == [(1, 8, 3, 2, 2)] * 2
    wan = tmp_path / "wan-latents"
    sampling.sample_latents(pipes / "wan", pipes / "prompts.txt", wan, steps=1, height=32, width=32, frames=9)
    report = api.prune(diffusers_dir_8, tmp_path / "st", preset="flash-wan2.1", calib=str(wan), height=32, width=32)
    assert report["calibration"]["clips"] == 2


def test_prompts_are_checked_in_one_line(pipes, tmp_path, monkeypatch):
    def refused(text: str | bytes, match: str) -> None:
        f = tmp_path / "p.txt"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(InputError, match=match) as e:
            sampling.sample_latents(pipes / "wan", f, tmp_path / "out", steps=1)
        assert "\n" not in str(e.value)

    refused("", "holds no prompt")
    refused("\n  \n\n", "holds no prompt")
    refused("a cat\n" + "x" * (sampling.MAX_PROMPT_CHARS + 1) + "\n", "line 2 has 2001 characters")
    refused(b"a \xff cat\n", "not UTF-8")
    monkeypatch.setattr(sampling, "MAX_PROMPTS", 2)
    refused("a\nb\nc\n", "more than 2 prompts")
    with pytest.raises(InputError, match="prompts file not found"):
        sampling.sample_latents(pipes / "wan", tmp_path / "none.txt", tmp_path / "out")
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        sampling.sample_latents(pipes / "wan" / "vae", ["a cat"], tmp_path / "out", steps=1)
    with pytest.raises(InputError, match="steps must be"):
        sampling.sample_latents(pipes / "wan", ["a cat"], tmp_path / "out", steps=0)
    assert not (tmp_path / "out").exists()


def test_the_command_writes_aside_and_replaces_only_its_own_folder(pipes, tmp_path):
    runner = CliRunner()
    args = ["sample-latents", "--pipeline", str(pipes / "wan"), "--prompts", str(pipes / "prompts.txt")]
    small = ["--steps", "1", "--height", "32", "--width", "32", "--frames", "5", "--device", "cpu", "-q"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "lat"), *small])
    assert r.exit_code == 0, r.output
    assert "wrote 2 latents files" in r.output
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "lat"), *small, "--seed", "9"])  # a rerun replaces it
    assert r.exit_code == 0 and json.loads((tmp_path / "lat" / "prompts.json").read_text())["settings"]["seed"] == 9
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "mine"), *small])
    assert r.exit_code == 2 and "is not a latents folder" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat", "mine"]  # nothing left aside
