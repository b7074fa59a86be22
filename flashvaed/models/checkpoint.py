"""Reading and writing Wan2.1 VAE checkpoints in every layout users have them in.

Layouts: ``original`` (the release's ``Wan2.1_VAE.pth`` state dict), ``diffusers`` (an
``AutoencoderKLWan`` directory, or its state dict in one .safetensors file) and ``flashvaed``
(our module names). The architecture is inferred from tensor shapes, keys are matched strictly,
and nothing is unpickled beyond plain tensors (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import atomic_output
from ..errors import CheckpointError
from ..safeload import load_weights_only
from .student import STUDENT_FORMAT, FlashStudent, StudentConfig
from .wan import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, LatentDecoder, WanConfig, WanVAE

LAYOUTS = ("flashvaed", "original", "diffusers")
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# Residual block parameter names: ours -> (original, diffusers)
_RESIDUAL = {
    "norm1": ("residual.0", "norm1"),
    "conv1": ("residual.2", "conv1"),
    "norm2": ("residual.3", "norm2"),
    "conv2": ("residual.6", "conv2"),
    "shortcut": ("shortcut", "conv_shortcut"),
}


def _residual(rest: str, layout: int) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESIDUAL[head][layout]}.{tail}"


def _rename(key: str, layout: str, nrb: int) -> str:
    """Name of our parameter ``key`` in ``layout`` (``nrb``: residual blocks per encoder stage)."""
    if layout == "flashvaed":
        return key
    orig = layout == "original"
    li = 0 if orig else 1
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"quant_conv\.(.*)", lambda m: f"conv1.{m[1]}" if orig else m[0]),
        (r"post_quant_conv\.(.*)", lambda m: f"conv2.{m[1]}" if orig else m[0]),
        (r"(encoder|decoder)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}" if orig else m[0]),
        (
            r"(encoder|decoder)\.middle\.blocks\.([02])\.(.*)",
            lambda m: (
                f"{m[1]}.middle.{m[2]}.{_residual(m[3], 0)}"
                if orig
                else f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.{_residual(m[3], 1)}"
            ),
        ),
        (
            r"(encoder|decoder)\.middle\.blocks\.1\.(.*)",
            lambda m: f"{m[1]}.middle.1.{m[2]}" if orig else f"{m[1]}.mid_block.attentions.0.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.head\.norm\.(.*)",
            lambda m: f"{m[1]}.head.0.{m[2]}" if orig else f"{m[1]}.norm_out.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.head\.conv\.(.*)",
            lambda m: f"{m[1]}.head.2.{m[2]}" if orig else f"{m[1]}.conv_out.{m[2]}",
        ),
        # the encoder's stages are one flat list in both external layouts
        (
            r"encoder\.down\.(\d+)\.blocks\.(\d+)\.(.*)",
            lambda m: (
                f"encoder.{'downsamples' if orig else 'down_blocks'}.{int(m[1]) * (nrb + 1) + int(m[2])}"
                f".{_residual(m[3], li)}"
            ),
        ),
        (
            r"encoder\.down\.(\d+)\.resample\.(conv|time_conv)\.(.*)",
            lambda m: (
                f"encoder.{'downsamples' if orig else 'down_blocks'}.{int(m[1]) * (nrb + 1) + nrb}"
                f".{'resample.1' if m[2] == 'conv' else 'time_conv'}.{m[3]}"
            ),
        ),
        # the decoder's up stages: flat in the original, nested in diffusers
        (
            r"decoder\.up\.(\d+)\.blocks\.(\d+)\.(.*)",
            lambda m: (
                f"decoder.upsamples.{int(m[1]) * (nrb + 2) + int(m[2])}.{_residual(m[3], 0)}"
                if orig
                else f"decoder.up_blocks.{m[1]}.resnets.{m[2]}.{_residual(m[3], 1)}"
            ),
        ),
        (
            r"decoder\.up\.(\d+)\.resample\.(conv|time_conv)\.(.*)",
            lambda m: (
                (
                    f"decoder.upsamples.{int(m[1]) * (nrb + 2) + nrb + 1}."
                    if orig
                    else f"decoder.up_blocks.{m[1]}.upsamplers.0."
                )
                + ("resample.1" if m[2] == "conv" else "time_conv")
                + f".{m[3]}"
            ),
        ),
    ]
    for pattern, rename in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return rename(m)
    raise KeyError(f"no {layout} name for parameter {key}")


def layout_names(model: LatentDecoder, layout: str) -> dict[str, str]:
    """Our parameter name -> its name in ``layout``, for every parameter of ``model``."""
    if layout == "flashvaed":
        return {k: k for k in model.state_dict()}
    nrb = model.config.num_res_blocks
    return {k: _rename(k, layout, nrb) for k in model.state_dict()}


def detect_layout(keys: set[str] | Mapping[str, object]) -> str | None:
    if "decoder.conv1.weight" in keys:
        return "original"
    if "decoder.conv_in.weight" in keys and "decoder.norm_out.gamma" in keys:
        return "diffusers"
    if "decoder.conv_in.weight" in keys and "decoder.head.conv.weight" in keys:
        return "flashvaed"
    return None


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def read_tensors(path: Path) -> dict[str, Tensor]:
    """A flat name -> tensor mapping from a .safetensors or a weights-only torch file."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({e})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"unknown checkpoint extension {path.suffix!r} for {path} "
            f"(expected .safetensors, {', '.join(TORCH_SUFFIXES)} or a diffusers directory)"
        )
    obj = load_weights_only(path, CheckpointError)
    for wrapper in ("state_dict", "model", "module", "vae"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 4:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    return obj


@dataclass
class KeyReport:
    """How a checkpoint's keys fit a model; names are given in the checkpoint's own layout."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        parts = []
        for label, names in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatches", self.mismatched),
        ):
            if names:
                more = f", +{len(names) - limit} more" if len(names) > limit else ""
                parts.append(f"{len(names)} {label} ({', '.join(names[:limit])}{more})")
        return "; ".join(parts) or "all keys match"


def match_keys(model: LatentDecoder, tensors: Mapping[str, Tensor], layout: str) -> tuple[dict[str, Tensor], KeyReport]:
    """Rename ``tensors`` to our names and check them against ``model`` strictly."""
    names = layout_names(model, layout)
    theirs_to_ours = {v: k for k, v in names.items()}
    expected = model.state_dict()
    report = KeyReport()
    renamed: dict[str, Tensor] = {}
    for key, value in tensors.items():
        ours = theirs_to_ours.get(key)
        if ours is None:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[ours].shape):
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[ours].shape)}")
        else:
            renamed[ours] = value
    report.missing = [names[k] for k in expected if names[k] not in tensors]
    return renamed, report


def infer_config(tensors: Mapping[str, Tensor], layout: str, extra: Mapping | None = None) -> WanConfig:
    """The architecture from tensor shapes (base width, z_dim), diffusers' config.json if given."""
    extra = dict(extra or {})
    if extra.get("is_residual") or extra.get("patch_size"):
        raise CheckpointError("this is a Wan2.2 VAE (residual, patchified); only Wan2.1 VAEs are supported")
    dec_key = "decoder.conv1.weight" if layout == "original" else "decoder.conv_in.weight"
    enc_key = "encoder.conv1.weight" if layout == "original" else "encoder.conv_in.weight"
    dim_mult = tuple(extra.get("dim_mult", (1, 2, 4, 4)))
    dec_w = tensors[dec_key]
    if dec_w.dim() != 5:
        raise CheckpointError(f"{dec_key} has shape {tuple(dec_w.shape)}, expected a 3D conv kernel")
    z_dim = int(dec_w.shape[1])
    decoder_dim = int(dec_w.shape[0]) // dim_mult[-1]
    base_dim = int(tensors[enc_key].shape[0]) if enc_key in tensors else decoder_dim
    if "latents_mean" in extra and "latents_std" in extra:
        mean, std = tuple(extra["latents_mean"]), tuple(extra["latents_std"])
    elif z_dim == len(WAN21_LATENTS_MEAN):
        mean, std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    else:
        raise CheckpointError(f"latent statistics for z_dim={z_dim} are unknown (Wan2.1 has 16 latent channels)")
    try:
        return WanConfig(
            base_dim=base_dim,
            decoder_base_dim=decoder_dim if decoder_dim != base_dim else None,
            z_dim=z_dim,
            dim_mult=dim_mult,
            num_res_blocks=int(extra.get("num_res_blocks", 2)),
            temporal_downsample=tuple(extra.get("temperal_downsample", (False, True, True))),
            latents_mean=mean,
            latents_std=std,
        )
    except ValueError as e:
        raise CheckpointError(f"inconsistent VAE configuration: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def load_wan(path: str | os.PathLike) -> WanVAE:
    """A Wan2.1 VAE from an original .pth, a diffusers directory or a .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    extra: dict = {}
    if path.is_dir():
        config_path, weights = path / "config.json", path / DIFFUSERS_WEIGHTS
        if not (config_path.is_file() and weights.is_file()):
            raise CheckpointError(f"{path} is not a model directory (expected config.json and {DIFFUSERS_WEIGHTS})")
        extra = _read_json(config_path)
        tensors = read_tensors(weights)
    else:
        tensors = read_tensors(path)
    layout = detect_layout(tensors)
    if layout is None:
        sample = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise CheckpointError(f"{path} is not a Wan2.1 VAE checkpoint (keys start: {sample})")
    config = infer_config(tensors, layout, extra)
    model = WanVAE(config)
    renamed, report = match_keys(model, tensors, layout)
    if not report.ok:
        raise CheckpointError(
            f"{path} does not fit a Wan2.1 VAE (base_dim {config.base_dim}, z_dim {config.z_dim}): " + report.summary()
        )
    model.load_state_dict(renamed, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# writing files
# ---------------------------------------------------------------------------------------------
def save_wan(model: WanVAE, path: str | os.PathLike, layout: str = "flashvaed") -> Path:
    """Write ``model`` in ``layout``: a .pth/.safetensors file, or a diffusers directory."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    path = Path(path)
    names = layout_names(model, layout)
    tensors = {names[k]: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers" and path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        c = model.config
        config = {
            "_class_name": "AutoencoderKLWan",
            "base_dim": c.base_dim,
            "decoder_base_dim": c.decoder_base_dim,
            "z_dim": c.z_dim,
            "dim_mult": list(c.dim_mult),
            "num_res_blocks": c.num_res_blocks,
            "attn_scales": [],
            "temperal_downsample": list(c.temporal_downsample),
            "dropout": 0.0,
            "latents_mean": list(c.latents_mean),
            "latents_std": list(c.latents_std),
        }
        _write(path / DIFFUSERS_WEIGHTS, tensors)
        with atomic_output(path / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
        return path
    _write(path, tensors)
    return path


def _write(path: Path, tensors: dict[str, Tensor]) -> None:
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, str(tmp))


# ---------------------------------------------------------------------------------------------
# student directories: config.json + model.safetensors (+ prune_report.json, ...)
# ---------------------------------------------------------------------------------------------
STUDENT_WEIGHTS = "model.safetensors"


def is_student_dir(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("format") == STUDENT_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_student(path: str | os.PathLike) -> FlashStudent:
    path = Path(path)
    data = _read_json(path / "config.json")
    if data.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path} is not a flashvaed student directory")
    if data.get("version", 1) > 1:
        raise CheckpointError(f"{path} was written by a newer flashvaed (student format {data['version']})")
    try:
        config = StudentConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json is malformed: {e}") from None
    model = FlashStudent(config)
    tensors = read_tensors(path / STUDENT_WEIGHTS) if (path / STUDENT_WEIGHTS).is_file() else None
    if tensors is None:
        raise CheckpointError(f"{path} has no {STUDENT_WEIGHTS}")
    renamed, report = match_keys(model, tensors, "flashvaed")
    if not report.ok:
        raise CheckpointError(f"{path}/{STUDENT_WEIGHTS} does not fit its config.json: {report.summary()}")
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def save_student(model: FlashStudent, out_dir: str | os.PathLike, extra: dict[str, object] | None = None) -> Path:
    """Write a student directory atomically: config.json, model.safetensors, and ``extra`` JSON files.

    An existing directory is replaced only if it is itself a student directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (is_student_dir(out_dir) or (out_dir.is_dir() and not any(out_dir.iterdir()))):
        raise CheckpointError(f"{out_dir} exists and is not a student directory; choose a new output")
    with atomic_output(out_dir, directory=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / STUDENT_WEIGHTS))
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
    return out_dir


def load_model(path: str | os.PathLike) -> LatentDecoder:
    """Any model a MODEL argument may name, its format detected from the path."""
    if is_student_dir(Path(path)):
        return load_student(path)
    return load_wan(path)
