"""Checkpoint readers: every layout, shape-inferred widths, strict keys, no pickled code."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from conftest import latent_stats
from safetensors.torch import save_file

from flashvaed.errors import CheckpointError
from flashvaed.models import load_model, save_teacher
from flashvaed.models.checkpoint import layout_names


def _original_state_dict(model):
    names = layout_names(model, "original")
    return {names[k]: v.clone() for k, v in model.state_dict().items()}


def _assert_decodes_like(model, ref):
    latents = torch.randn(1, 16, 2, 2, 3)
    mean, std = latent_stats(ref)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(latents), ref.decode(latents * std + mean).sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", ["diffusers_vae_8", "diffusers_vae_16"])
def test_original_pth_with_width_inferred_from_shapes(fixture, request, tmp_path):
    ref = request.getfixturevalue(fixture)
    teacher = load_model_from_diffusers(ref, tmp_path)
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(_original_state_dict(teacher), path)  # a plain state dict, as released
    model = load_model(path)
    assert model.config.base_dim == ref.config.base_dim
    assert model.config.z_dim == 16
    _assert_decodes_like(model, ref)


def load_model_from_diffusers(ref, tmp_path):
    ref.save_pretrained(tmp_path / "d")
    return load_model(tmp_path / "d")


def test_diffusers_directory(diffusers_vae_8, diffusers_dir_8):
    model = load_model(diffusers_dir_8)
    assert json.loads((diffusers_dir_8 / "config.json").read_text())["base_dim"] == model.config.base_dim
    _assert_decodes_like(model, diffusers_vae_8)


def test_single_safetensors_in_each_layout(diffusers_vae_8, teacher_8, tmp_path):
    save_file({k: v.contiguous() for k, v in diffusers_vae_8.state_dict().items()}, tmp_path / "d.safetensors")
    save_file({k: v.contiguous() for k, v in _original_state_dict(teacher_8).items()}, tmp_path / "o.safetensors")
    save_teacher(teacher_8, tmp_path / "f.safetensors")
    for name in ("d", "o", "f"):
        _assert_decodes_like(load_model(tmp_path / f"{name}.safetensors"), diffusers_vae_8)


def test_writer_round_trips_every_layout(teacher_8, tmp_path):
    for layout, target in [("original", "a.pth"), ("diffusers", "b"), ("flashvaed", "c.safetensors")]:
        loaded = load_model(save_teacher(teacher_8, tmp_path / target, layout))
        for (k, v), (k2, v2) in zip(teacher_8.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)


def test_wrapped_state_dict_is_accepted(teacher_8, tmp_path):
    torch.save({"state_dict": _original_state_dict(teacher_8)}, tmp_path / "w.ckpt")
    assert load_model(tmp_path / "w.ckpt").config.base_dim == 8


def test_missing_unexpected_and_mismatched_keys_are_named(teacher_8, tmp_path):
    sd = _original_state_dict(teacher_8)
    del sd["decoder.upsamples.3.time_conv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    sd["decoder.head.2.bias"] = torch.zeros(4)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing (decoder.upsamples.3.time_conv.weight)" in msg
    assert "1 unexpected (decoder.extra.weight)" in msg
    assert "decoder.head.2.bias: checkpoint (4,) vs model (3,)" in msg


class Payload:
    """An arbitrary class: unpickling it would run code the user never agreed to."""


def test_pickled_code_is_refused(tmp_path):
    torch.save({"decoder.conv1.weight": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="pickled code"):
        load_model(tmp_path / "evil.pth")
    torch.save(collections.OrderedDict(a=torch.zeros(1)), tmp_path / "plain.pth")  # allowed type
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE checkpoint"):
        load_model(tmp_path / "plain.pth")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_corrupt_files(tmp_path, content):
    for name in ("x.pth", "x.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot read"):
            load_model(tmp_path / name)


def test_foreign_and_unknown(tmp_path):
    with pytest.raises(CheckpointError, match="model not found"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint extension"):
        load_model(tmp_path / "m.onnx")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path / "emptydir")
    save_file({"unet.conv.weight": torch.zeros(2, 2)}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE checkpoint"):
        load_model(tmp_path / "unet.safetensors")


def test_config_contradicting_the_keys_is_refused(diffusers_dir_8, tmp_path):
    import shutil

    d = tmp_path / "wan22"
    shutil.copytree(diffusers_dir_8, d)
    config = json.loads((d / "config.json").read_text())
    config.update(is_residual=True, patch_size=2)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Wan2.2"):
        load_model(d)
