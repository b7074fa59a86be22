"""Mochi checkpoints that lie: a diffusers directory whose config.json or tensors say something the
other cannot be, refused where they are read, in one line naming the field, with exit 2 (the
conventions of tests/hostile.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import assert_refused
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flashvaed.cli import app
from flashvaed.models import families, load_model, save_teacher

runner = CliRunner()
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The family's tiny teacher as a diffusers directory."""
    torch.manual_seed(0)
    family = families.get("mochi")
    d = tmp_path_factory.mktemp("mochi-fuzz") / "vae"
    save_teacher(family.teacher_type(family.tiny_config()), d, "diffusers")
    return d


def config_change(key: str, value: object) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        data = json.loads((d / "config.json").read_text())
        data[key] = value
        (d / "config.json").write_text(json.dumps(data))

    return change


def tensor_change(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        tensors = load_file(str(d / WEIGHTS))
        tensors[key] = make(tensors[key])
        save_file(tensors, str(d / WEIGHTS))

    return change


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "widths_against_the_shapes": (
        config_change("decoder_block_out_channels", [32, 32, 32, 48]),
        "decoder_block_out_channels",
    ),
    "widths_a_string": (config_change("encoder_block_out_channels", "32,32,32,32"), "encoder_block_out_channels"),
    "layers_list_too_short": (config_change("layers_per_block", [1, 1, 1]), "layers_per_block"),
    "temporal_expansion_huge": (config_change("temporal_expansions", [1, 2, 10**9]), "temporal_expansions"),
    "temporal_expansion_zero": (config_change("temporal_expansions", [1, 0, 3]), "temporal_expansions"),
    "attention_flags_strings": (config_change("add_attention_block", ["no"] * 5), "add_attention_block"),
    "latents_std_zero": (config_change("latents_std", [0.0] * 12), "latents_std"),
    "latents_mean_short": (config_change("latents_mean", [0.0] * 3), "latents_mean"),
    "scaling_factor_negative": (config_change("scaling_factor", -1.0), "scaling_factor"),
    "scaling_factor_nan": (config_change("scaling_factor", float("nan")), "scaling_factor"),
    "latent_channels_lie": (config_change("latent_channels", 16), "latent"),
    "a_conv_of_another_width": (
        tensor_change("decoder.block_in.resnets.0.conv1.conv.weight", lambda t: t[:16]),
        "decoder.block_in.resnets.0.conv1.conv.weight",
    ),
    "a_missing_tensor": (
        lambda d: save_file(
            {k: v for k, v in load_file(str(d / WEIGHTS)).items() if not k.startswith("decoder.proj_out")},
            str(d / WEIGHTS),
        ),
        "proj_out",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_lying_mochi_checkpoint_is_refused_in_one_line(clean, tmp_path, name):
    d = tmp_path / "vae"
    shutil.copytree(clean, d)
    tamper, needle = CASES[name]
    tamper(d)
    r = runner.invoke(app, ["info", str(d)])
    assert_refused(r.output, r.exit_code, needle, None, None)


def test_the_untampered_directory_loads(clean):
    assert load_model(clean).family == "mochi"
