"""What a model family module provides, and the registry that finds families by name or by keys.

A family owns everything specific to one VAE: its configuration (a dataclass read from and written
to dicts), how to recognise its checkpoints in each source layout, its key maps, the configuration
inferred from tensor shapes, its blocks, its teacher layout and its decoder and encoder modules.
Everything else in flashvaed asks the model (``LatentDecoder``/``TeacherVAE``) or the family
through this interface, never a family's name.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import CheckpointError
from ..layout import DecoderLayout

LAYOUTS = ("flashvaed", "original", "diffusers")


# configuration dataclasses: what every family's ``__post_init__`` checks, wherever its values came
# from (a config.json, safetensors metadata, a student's config.json). A ValueError names the field;
# the reader that built the configuration adds the file.
def check_int(name: str, value: Any, lo: int, hi: int) -> None:
    """Refuse a configuration field that is not an integer in [lo, hi] (booleans are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}"[:200])


def check_sequence(name: str, value: Any, max_len: int) -> tuple:
    """A list field as a tuple: a string or a mapping is not a list, even though it iterates."""
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= max_len:
        raise ValueError(f"{name} must be a list of 1 to {max_len} entries, got {value!r}"[:200])
    return tuple(value)


def checked_statistics(mean: Any, std: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(latents_mean, latents_std)`` as tuples of floats: one finite number per latent channel,
    and a positive std. Encoding divides by the std and decoding multiplies by it, so a zero writes
    Inf latents and a negative one flips a channel: refused, naming the field and entry. Models hold
    them as float32, so the bounds are float32's (a std of 1e-50 would be stored as zero)."""
    f32 = torch.finfo(torch.float32)
    checked = []
    for name, values in (("latents_mean", mean), ("latents_std", std)):
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"{name} must be a list of {channels} numbers, got {type(values).__name__}")
        if len(values) != channels:
            raise ValueError(f"{name} has {len(values)} entries; the model has {channels} latent channels")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not abs(v) <= f32.max:
                raise ValueError(f"{name}[{i}] is {v!r}, not a finite float32 number"[:200])
            if name == "latents_std" and not v >= f32.tiny:
                raise ValueError(f"{name}[{i}] is {v!r}; a standard deviation must be positive (>= {f32.tiny:.2g})")
        checked.append(tuple(float(v) for v in values))
    return checked[0], checked[1]


# config.json / safetensors metadata: read with care, every value is untrusted
def config_int(config: Mapping, key: str, default: int, lo: int, hi: int) -> int:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CheckpointError(f"config field {key}={value!r} must be an integer in [{lo}, {hi}]")
    return value


def config_scale(config: Mapping, key: str = "scaling_factor") -> float:
    """A positive finite float field (a latent scaling factor), 1.0 when absent."""
    value = config.get(key, 1.0)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise CheckpointError(f"config field {key}={value!r} must be a finite number > 0"[:200])
    return float(value)


def config_list(config: Mapping, key: str, default: tuple, kind: type, max_len: int = 8) -> tuple:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= max_len:
        raise CheckpointError(f"config field {key} must be a list of 1 to {max_len} entries, got {value!r}"[:200])

    def fits(v: object) -> bool:
        if kind is bool:
            return isinstance(v, bool)
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else kind):
            return False
        return kind is not float or math.isfinite(v)

    if not all(fits(v) for v in value):
        raise CheckpointError(f"config field {key} must hold {kind.__name__} values, got {value!r}"[:200])
    return tuple(value)


def our_metadata(config: Mapping) -> tuple[str | None, dict]:
    """(family, config) from the metadata flashvaed writes into its own .safetensors files."""
    family = config.get("flashvaed.family")
    raw = config.get("flashvaed.config")
    if raw is None:
        return family, {}
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (json.JSONDecodeError, RecursionError):  # RecursionError: arrays nested past Python's stack
        raise CheckpointError("the checkpoint's flashvaed.config metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError("the checkpoint's flashvaed.config metadata is not a JSON object")
    return family, data


def conv_shape(tensors: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"the checkpoint lacks {key}")
    shape = tuple(tensors[key].shape)
    if len(shape) != 5:
        raise CheckpointError(f"{key} has shape {shape}, expected a 3D conv kernel")
    return shape


# tensors in a family's own layouts
def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, T, H*p, W*p) -> (B, C*p*p, T, H, W), channel ``c*p*p + r*p + q`` (r column, q row)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Inverse of ``patchify``."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


def tiny_statistics(channels: int) -> dict[str, tuple[float, ...]]:
    """``latents_mean``/``latents_std`` for a ``Family.tiny_config``: deterministic and away from
    0 and 1, so a dropped or misapplied de-normalisation changes the frames."""
    mean = tuple(round(0.1 * ((i % 5) - 2), 4) for i in range(channels))
    std = tuple(round(0.5 + 0.125 * (i % 7), 4) for i in range(channels))
    return {"latents_mean": mean, "latents_std": std}


@dataclass(frozen=True)
class Match:
    """A family's recognition of a checkpoint: the source layout and a key that proves it."""

    family: Family
    layout: str
    evidence: str
    student: bool = False  # the checkpoint holds a released student, read by ``Family.read_student``


class Family:
    """One VAE family. Subclasses fill in the class attributes and methods below."""

    name: ClassVar[str]  # "wan2.1"
    title: ClassVar[str]  # "Wan2.1 VAE", for messages
    diffusers_vae: ClassVar[str]  # the diffusers class of its VAE ("AutoencoderKLWan"): which pipelines take it
    config_type: ClassVar[type]  # the configuration dataclass (to_dict / from_dict)
    teacher_type: ClassVar[type]  # the TeacherVAE subclass
    default_resolution: ClassVar[tuple[int, int]] = (480, 832)  # for MACs reports: (height, width) pixels
    ops: ClassVar[tuple[str, ...]] = ("causal3d", "dwsep3d", "spatial2d")  # operator kinds its decoders build
    resample_convs: ClassVar[tuple[str, ...]] = ("conv",)  # upsample convs its decoders build (blocks.RESAMPLE_CONVS)
    # frames of a calibration (prune) or training (distill) clip when none are given: a tn+1 length for
    # the family's temporal factor t (9 fits 4x and 8x families; a 6x family takes 13)
    clip_frames: ClassVar[int] = 9
    # the small trained teacher in flashvaed/data that `flashvaed demo --family NAME` runs on (docs/demo.md);
    # the demo's student is the family's ``flash-NAME`` preset
    embedded_teacher: ClassVar[str | None] = None
    # diffusers pipelines (``flashvaed.diffusers.FlashVAE`` stands in for ``diffusers_vae`` in them):
    # ``pipelines`` names them for messages; ``pipeline_reads`` is what they read of their VAE beyond
    # device, dtype, decode, encode, the ``latents_mean``/``latents_std`` (C,) tensors and
    # ``spatial_compression_ratio``: config fields as "config.NAME" (``pipeline_fields`` gives their
    # values) and attributes FlashVAE provides for any family that lists them ("temporal_compression_ratio").
    # A name only other families list is another family's pipeline asking: ``FamilyMismatchError``.
    pipelines: ClassVar[str] = ""
    pipeline_reads: ClassVar[tuple[str, ...]] = ()
    # where the family is listed among families (``names()``, messages, the demo's families): lowest
    # first, then by name; registration (import) order does not matter
    order: ClassVar[int] = 100

    # recognising checkpoints ------------------------------------------------------------------
    def layouts_present(self, keys: Collection[str]) -> dict[str, str]:
        """Layout -> a key in that layout's naming, for every layout whose names the keys use."""
        raise NotImplementedError

    def detect(self, keys: Collection[str], tensors: Mapping[str, Tensor], config: Mapping) -> list[Match]:
        """Every layout of this family the keys (and config.json / metadata) point at, with evidence."""
        raise NotImplementedError

    def infer_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> Any:
        """The architecture from tensor shapes (widths, latent channels) and a config, if given."""
        raise NotImplementedError

    def config_tensor_keys(self, layout: str, keys: Collection[str]) -> set[str]:
        """Tensors of a checkpoint that hold configuration (e.g. latent statistics), not weights:
        read by ``infer_config`` and left out of key matching."""
        return set()

    def config_tensors(self, config: Any, layout: str) -> dict[str, Tensor]:
        """Configuration tensors a checkpoint written in ``layout`` carries beside the weights."""
        return {}

    def file_metadata(self, config: Any, layout: str) -> dict[str, str] | None:
        """Safetensors metadata of a single-file checkpoint written in ``layout`` (ours: our own)."""
        return None

    def read_student(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping, where: str) -> tuple[Any, dict]:
        """A released student's ``StudentConfig`` (its layout derived from the file's shapes) and its
        parameters under our names, for a ``Match`` with ``student=True`` (``flashvaed.models.released``)."""
        raise CheckpointError(f"{self.title} checkpoints in the {layout} layout hold no student")

    def key_names(self, model: nn.Module, layout: str) -> dict[str, str]:
        """Our parameter name -> its name in ``layout``, for every entry of ``model.state_dict()``."""
        raise NotImplementedError

    def diffusers_config(self, config: Any) -> dict[str, Any]:
        """config.json of the diffusers model class this family's checkpoints load into."""
        raise NotImplementedError

    def describe(self, config: Any) -> str:
        """The few numbers that tell two teachers of the family apart, for messages."""
        raise NotImplementedError

    # building ---------------------------------------------------------------------------------
    def tiny_config(self) -> Any:
        """The smallest teacher configuration of the family that still exercises its features (its
        stage names, upsampler kinds, conditioning, non-trivial latent statistics): what the
        conformance test and the docs build, with random weights. Every family implements it."""
        raise NotImplementedError(
            f"{type(self).__name__} ({self.name}) does not implement tiny_config(): every family must "
            "return its smallest teacher configuration (see base.Family.tiny_config)"
        )

    def config_from_dict(self, d: Mapping[str, Any]) -> Any:
        """A teacher's configuration as a student's config.json holds it (ValueError if malformed)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"the teacher configuration must be a mapping, got {type(d).__name__}")
        return self.config_type.from_dict(dict(d))

    def scaling_factor(self, config: Any) -> float:
        """The factor latents are scaled by in diffusion space, beyond the per-channel statistics:
        its pipelines de-normalise ``latents * latents_std / scaling_factor + latents_mean`` and
        encoding normalises ``(mu - latents_mean) * scaling_factor / latents_std``. Finite, > 0."""
        return 1.0

    def pipeline_fields(self, config: Any, model: Any) -> dict[str, Any]:
        """The config fields its diffusers pipelines read from their VAE (``FlashVAE.config``): one
        per "config.NAME" of ``pipeline_reads``. ``config``: the teacher's configuration; ``model``:
        the decoder the pipeline runs (a ``LatentDecoder`` or an ``engines.Decoder``: latent_channels,
        temporal_factor, spatial_factor, step_inputs), for facts a student may change."""
        return {}

    def teacher_layout(self, config: Any) -> DecoderLayout:
        raise NotImplementedError

    def upgrade_student_layout(self, layout: dict[str, Any], version: int) -> dict[str, Any]:
        """A student directory's layout written by an older flashvaed (format ``version``), as this
        version reads it: the same model."""
        return layout

    def build_decoder(self, config: Any, layout: DecoderLayout, student: bool = False) -> nn.Module:
        """The decoder for ``layout`` (the teacher's or a student's) of a teacher with ``config``.

        ``student``: the decoder of a student (or pruned teacher), which may carry parameters a
        teacher's lacks (e.g. gains on parameter-free norms, for pruning to rescale). That is the
        model's kind, never read from the layout: a student can have its teacher's widths."""
        raise NotImplementedError

    def build_encoder(self, config: Any) -> nn.Module:
        raise NotImplementedError

    def build_post_quant_conv(self, config: Any) -> nn.Module:
        return nn.Identity()

    def build_quant_conv(self, config: Any) -> nn.Module:
        return nn.Identity()


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry, which stays sorted by ``Family.order``, then name."""
    FAMILIES[family.name] = family
    ordered = sorted(FAMILIES.values(), key=lambda f: (f.order, f.name))
    FAMILIES.clear()
    FAMILIES.update((f.name, f) for f in ordered)
    return family


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def detect(tensors: Mapping[str, Tensor], config: Mapping, where: str) -> Match:
    """The one family and layout a checkpoint is in; anything else is refused in one line."""
    named = config.get("flashvaed.family")  # the metadata flashvaed writes (``checkpoint.save_teacher``)
    if named is not None and (not isinstance(named, str) or named not in FAMILIES):
        raise CheckpointError(
            f"{where}: its flashvaed.family metadata names an unknown model family {named!r} "
            f"(known: {', '.join(FAMILIES)})"[:300]
        )
    keys = set(tensors)
    for family in FAMILIES.values():
        present = family.layouts_present(keys)
        if len(present) > 1:
            parts = [f"{layout} ({key})" for layout, key in present.items()]
            raise CheckpointError(f"{where} mixes checkpoint layouts: " + " and ".join(parts))
    matches = [m for family in FAMILIES.values() for m in family.detect(keys, tensors, config)]
    if not matches:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        first, *others = [f.title for f in FAMILIES.values()]
        nor = f", nor a {' or '.join(others)} one" if others else ""
        raise CheckpointError(f"{where} is not a {first} checkpoint{nor} (keys start: {sample})")
    if len(matches) > 1:
        parts = [f"{m.family.title} {m.layout} ({m.evidence})" for m in matches[:3]]
        raise CheckpointError(f"{where} mixes checkpoint layouts: " + " and ".join(parts))
    return matches[0]


def any_key(keys: Collection[str], pattern: str) -> str | None:
    """The first key (sorted) matching ``pattern`` (a full-match regex), if any."""
    regex = re.compile(pattern)
    return next((k for k in sorted(keys) if regex.fullmatch(k)), None)
