"""diffusers habits of ``FlashVAE``: hub ids from the cache, pipeline folders with ``subfolder``,
``torch_dtype``, ``pipe.save_pretrained`` keeping the VAE (and loading back), and accelerate's
model and sequential CPU offload, all on tiny real pipelines with random weights, offline."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

pytest.importorskip("transformers")  # the pipeline modules import it, even with no text encoder
pytest.importorskip("accelerate")  # the offload tests (the test extra installs it)

import huggingface_hub
from diffusers import WanPipeline
from test_diffusers_pipelines import engine_of, wan_frames, wan_pipeline

from flashvaed import api
from flashvaed.diffusers import FlashVAE
from flashvaed.errors import CheckpointError, InputError

Z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))  # de-normalised Wan latents


def decoded(vae: FlashVAE) -> torch.Tensor:
    return vae.decode(Z.to(vae.dtype)).sample.float()


@pytest.fixture(scope="module")
def made(diffusers_vae_8, diffusers_dir_8, tmp_path_factory):
    """A pipeline folder with diffusers' VAE; a student; an ONNX Runtime engine of the teacher."""
    d = tmp_path_factory.mktemp("habits")
    wan_pipeline(WanPipeline, diffusers_vae_8).save_pretrained(d / "pipe")
    small = {"calib_clips": 1, "calib_frames": 5, "calib_size": 32, "height": 32, "width": 32}
    api.prune(diffusers_dir_8, d / "student", preset="flash-wan2.1", **small)
    return {
        "dir": d,
        "teacher": diffusers_dir_8,
        "pipe": d / "pipe",
        "student": d / "student",
        "engine": engine_of(diffusers_dir_8, d / "engine", "32:32:32"),
        "expected": decoded(FlashVAE.from_pretrained(diffusers_dir_8, device="cpu")),
    }


def hub_cache(root, repo: str, snapshots: dict[str, object], refs: dict[str, str]):
    """A Hugging Face cache holding ``repo`` as huggingface_hub lays it out: refs/NAME -> commit,
    snapshots/COMMIT/... (copies of local folders)."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for commit, folder in snapshots.items():
        shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    for name, commit in refs.items():
        (repo_dir / "refs" / name).write_text(commit)
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE in tmp (set after huggingface_hub read its environment, as
    in a notebook: FlashVAE reads both when it resolves an id)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_loads_from_the_offline_cache_at_a_revision(made, offline):
    a, b = "a" * 40, "b" * 40
    hub_cache(offline, "tiny-org/tiny-wan", {a: made["pipe"], b: made["student"]}, {"main": a, "v2": b})
    vae = FlashVAE.from_pretrained("tiny-org/tiny-wan", subfolder="vae", device="cpu")
    torch.testing.assert_close(decoded(vae), made["expected"], atol=1e-5, rtol=0)
    student = FlashVAE.from_pretrained("tiny-org/tiny-wan", revision="v2", device="cpu")
    assert type(student.decoder.model).__name__ == "FlashStudent"
    with pytest.raises(InputError, match=r'tiny-org/tiny-wan is a diffusers pipeline folder .*subfolder="vae"'):
        FlashVAE.from_pretrained("tiny-org/tiny-wan")
    with pytest.raises(InputError) as e:
        FlashVAE.from_pretrained("tiny-org/not-cached")
    assert "tiny-org/not-cached" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="at revision v3"):
        FlashVAE.from_pretrained("tiny-org/tiny-wan", subfolder="vae", revision="v3")


def test_local_files_only_and_cache_dir_work_without_the_environment(made, tmp_path):
    a = "c" * 40
    cache = hub_cache(tmp_path / "elsewhere", "tiny-org/wan-vae", {a: made["teacher"]}, {"main": a})
    vae = FlashVAE.from_pretrained("tiny-org/wan-vae", cache_dir=cache, local_files_only=True, device="cpu")
    torch.testing.assert_close(decoded(vae), made["expected"], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match=r"tiny-org/other .*local_files_only"):
        FlashVAE.from_pretrained("tiny-org/other", cache_dir=cache, local_files_only=True)


def test_a_pipeline_folder_takes_subfolder_which_stays_inside(made):
    with pytest.raises(InputError, match=r'pipeline folder \(model_index.json\); pass subfolder="vae"'):
        FlashVAE.from_pretrained(made["pipe"])
    vae = FlashVAE.from_pretrained(made["pipe"], subfolder="vae", device="cpu")
    torch.testing.assert_close(decoded(vae), made["expected"], atol=1e-5, rtol=0)
    for bad in ("../pipe/vae", "vae/../../pipe", "/etc", "", "."):
        with pytest.raises(InputError, match="subfolder"):
            FlashVAE.from_pretrained(made["pipe"], subfolder=bad)
    with pytest.raises(CheckpointError, match="has no vea"):
        FlashVAE.from_pretrained(made["pipe"], subfolder="vea")


def test_torch_dtype_is_the_dtype_after_loading(made):
    vae = FlashVAE.from_pretrained(made["teacher"], torch_dtype=torch.bfloat16, device="cpu")
    assert vae.dtype == torch.bfloat16 and next(vae.decoder.model.parameters()).dtype == torch.bfloat16
    assert decoded(vae).shape == made["expected"].shape
    assert FlashVAE.from_pretrained(made["teacher"], torch_dtype="float16", device="cpu").dtype == torch.float16
    engine = FlashVAE.from_pretrained(made["engine"], torch_dtype=torch.bfloat16)  # computes in float32
    assert engine.dtype == torch.bfloat16 and engine.decode(Z).sample.dtype == torch.bfloat16
    with pytest.raises(InputError, match="disagree"):
        FlashVAE.from_pretrained(made["teacher"], torch_dtype=torch.float16, dtype="bfloat16")
    assert FlashVAE.from_pretrained(made["teacher"], device_map={"": "cpu"}).device == torch.device("cpu")
    with pytest.raises(InputError, match="device_map"):
        FlashVAE.from_pretrained(made["teacher"], device_map="balanced")
    with pytest.raises(InputError, match="quantization_config"):
        FlashVAE.from_pretrained(made["teacher"], quantization_config={"bits": 4})
    with pytest.raises(TypeError, match="tile"):
        FlashVAE.from_pretrained(made["teacher"], tile=3)


def test_torch_models_keep_their_frames_where_they_run(made):
    """A torch model's frames stay on its device (no host round trip in a GPU pipeline); an
    engine's come from the host, as its contract says."""
    vae = FlashVAE.from_pretrained(made["student"], teacher=made["teacher"], device="cpu")
    assert vae.decoder.describe()["frames_on"] == "device"
    engine = FlashVAE.from_pretrained(made["engine"])
    assert not hasattr(engine.decoder, "frames_on") and engine.decode(Z).sample.device.type == "cpu"


@pytest.mark.parametrize("source", ["teacher", "student+teacher", "engine"])
def test_pipe_save_pretrained_keeps_the_flashvae(made, source, tmp_path, diffusers_vae_8):
    """The saved folder is self-contained: the engine's own folder is gone when it is read back."""
    if source == "engine":
        shutil.copytree(made["engine"], tmp_path / "engine")
        vae = FlashVAE.from_pretrained(tmp_path / "engine")
    elif source == "student+teacher":
        vae = FlashVAE.from_pretrained(made["student"], teacher=made["teacher"], device="cpu", chunk=1)
    else:
        vae = FlashVAE.from_pretrained(made["teacher"], device="cpu")
    pipe = wan_pipeline(WanPipeline, diffusers_vae_8)
    pipe.vae = vae
    expected = wan_frames(pipe, 32)
    pipe.save_pretrained(tmp_path / "saved")
    if source == "engine":
        shutil.rmtree(tmp_path / "engine")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["vae"] == ["flashvaed.diffusers", "FlashVAE"]
    back = FlashVAE.from_pretrained(tmp_path / "saved", subfolder="vae", device="cpu")
    torch.testing.assert_close(decoded(back), decoded(vae), atol=1e-5, rtol=0)
    if source == "student+teacher":
        assert back.teacher is not None and back.chunk == 1
    loaded = WanPipeline.from_pretrained(tmp_path / "saved", text_encoder=None, tokenizer=None)
    assert isinstance(loaded.vae, FlashVAE)
    torch.testing.assert_close(wan_frames(loaded, 32), expected, atol=1e-5, rtol=0)


def test_save_pretrained_replaces_only_a_model_folder(made, tmp_path):
    vae = FlashVAE.from_pretrained(made["teacher"], device="cpu")
    vae.save_pretrained(tmp_path / "vae")
    vae.save_pretrained(tmp_path / "vae")  # an old save is replaced whole
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not a model folder"):
        vae.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "vae"]  # no temporaries left


def test_save_pretrained_keeps_a_teacher_diffusers_cannot_describe(tmp_path):
    """The embedded LTX teacher narrows inside its up blocks (no diffusers config says that): it is
    saved as one flashvaed-layout file, as model and as the teacher beside a student, and loads back."""
    from flashvaed.demo import embedded_teacher_path
    from flashvaed.models import StudentSpec, load_model
    from flashvaed.models.student import build_student

    teacher = load_model(embedded_teacher_path("ltx"))
    vae = FlashVAE.from_pretrained(teacher, device="cpu")
    vae.save_pretrained(tmp_path / "vae")
    record = json.loads((tmp_path / "vae" / "flashvae.json").read_text())
    assert record["model"] == "model.safetensors" and sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "flashvae.json", "model.safetensors"
    ]  # fmt: skip
    back = FlashVAE.from_pretrained(tmp_path / "vae", device="cpu").decoder.model  # (its decode draws noise)
    assert back.config == teacher.config
    for (name, a), b in zip(teacher.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    student = build_student(StudentSpec.load("flash-ltx"), teacher.config)[0]
    paired = FlashVAE.from_pretrained(student, teacher, device="cpu")
    paired.save_pretrained(tmp_path / "paired")
    assert json.loads((tmp_path / "paired" / "flashvae.json").read_text())["teacher"] == "teacher.safetensors"
    again = FlashVAE.from_pretrained(tmp_path / "paired", device="cpu")
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    torch.testing.assert_close(again.encode(video).latent_dist.mean, paired.encode(video).latent_dist.mean)
    (tmp_path / "paired" / "flashvae.json").write_text(json.dumps({**record, "model": "../model.safetensors"}))
    with pytest.raises(CheckpointError, match="model must be absent or name model.safetensors"):
        FlashVAE.from_pretrained(tmp_path / "paired", device="cpu")


def test_passing_vae_to_pipeline_from_pretrained_logs_no_type_warning(made):
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(handler)
    try:
        vae = FlashVAE.from_pretrained(made["teacher"], device="cpu")
        pipe = WanPipeline.from_pretrained(made["pipe"], vae=vae, text_encoder=None, tokenizer=None)
        logger.warning("Expected types for vae: (int,), got <class 'str'>.")  # others' notices still pass
    finally:
        logger.removeHandler(handler)
    assert pipe.vae is vae
    assert lines == ["Expected types for vae: (int,), got <class 'str'>."]


@pytest.mark.parametrize("source", ["teacher", "engine"])
def test_model_cpu_offload_runs_the_pipeline(made, source, diffusers_vae_8):
    """accelerate's hooks on a CPU "accelerator" (device="cpu": the methods refuse to guess one here)."""
    pipe = wan_pipeline(WanPipeline, FlashVAE.from_pretrained(made[source], device="cpu"))
    expected = wan_frames(pipe, 32)
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the hooks are put back after each call (maybe_free_model_hooks)
        torch.testing.assert_close(wan_frames(pipe, 32), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["teacher", "engine"])
def test_sequential_cpu_offload_runs_the_pipeline(made, source):
    """Every layer hooked by accelerate: FlashVAE offloads as one model instead. The transformer is kept
    whole: accelerate 1.x fails on diffusers' own models when the execution device is the CPU."""
    vae = FlashVAE.from_pretrained(made[source], device="cpu")
    pipe = wan_pipeline(WanPipeline, vae)
    expected = wan_frames(pipe, 32)
    pipe._exclude_from_cpu_offload = ["transformer"]
    pipe.enable_sequential_cpu_offload(device="cpu")
    for _ in range(2):
        torch.testing.assert_close(wan_frames(pipe, 32), expected, atol=1e-5, rtol=0)
    if source == "teacher":
        assert all(p.device.type == "cpu" for p in vae.parameters())
