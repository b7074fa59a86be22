"""Reading and writing VAE checkpoints in every layout users have them in, for every family.

Layouts: ``original`` (a family's release, e.g. ``Wan2.1_VAE.pth``), ``diffusers`` (a model
directory, or its state dict in one .safetensors file) and ``flashvaed`` (our module names). The
family and layout are detected from the keys (and config.json or safetensors metadata), the
architecture is inferred from tensor shapes, keys are matched strictly — against a model built on
the ``meta`` device first, so a file that does not fit never makes us allocate its model — and
nothing is unpickled beyond plain tensors (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_output
from ..errors import CheckpointError, InputError
from ..safeload import check_file, json_format, load_weights_only, read_text
from . import families
from .families import LAYOUTS
from .student import STUDENT_FORMAT, STUDENT_VERSION, FlashStudent, StudentConfig
from .vae import LatentDecoder, TeacherVAE

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
STUDENT_WEIGHTS = "model.safetensors"
STUDENT_DIR = "a student directory"


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def read_tensors(path: Path) -> dict[str, Tensor]:
    """A flat name -> tensor mapping from a .safetensors or a weights-only torch file."""
    if path.suffix == ".safetensors":
        check_file(path, CheckpointError, "checkpoint")  # torch files: load_weights_only checks
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


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a .safetensors file (empty for other files)."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({e})") from None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path, CheckpointError, "config.json"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and what describes them: a diffusers directory's config.json, a file's metadata."""
    if path.is_dir():
        config_path, weights = path / "config.json", path / DIFFUSERS_WEIGHTS
        if not (config_path.is_file() and weights.is_file()):
            raise CheckpointError(f"{path} is not a model directory (expected config.json and {DIFFUSERS_WEIGHTS})")
        return read_tensors(weights), read_json(config_path)
    tensors = read_tensors(path)
    return tensors, read_metadata(path)


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


def layout_names(model: LatentDecoder, layout: str) -> dict[str, str]:
    """Our parameter name -> its name in ``layout``, for every parameter of ``model``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    return families.get(model.family).key_names(model, layout)


def match_keys(model: nn.Module, tensors: Mapping[str, Tensor], layout: str) -> tuple[dict[str, Tensor], KeyReport]:
    """Rename ``tensors`` to our names and check them against ``model`` strictly."""
    names = layout_names(model, layout)  # type: ignore[arg-type]
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


def check_finite(tensors: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """A model with NaN or Inf weights decodes NaN frames: refuse it at load, not after a decode."""
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        more = f" and {len(broken) - 1} more tensors" if len(broken) > 1 else ""
        raise CheckpointError(f"{path} holds NaN or Inf weights ({broken[0]}{more})")


def build_checked(
    build: Callable[[], LatentDecoder], tensors: Mapping[str, Tensor], layout: str, problem: Callable[[str], str]
) -> LatentDecoder:
    """``build()`` with ``tensors`` loaded, refusing (``problem(summary)``) keys that do not fit —
    decided on a copy built on the meta device, before the real model is allocated."""
    with torch.device("meta"):
        shadow = build()
    _, report = match_keys(shadow, tensors, layout)
    if not report.ok:
        raise CheckpointError(problem(report.summary()))
    model = build()
    renamed, _ = match_keys(model, tensors, layout)
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def load_vae(path: str | os.PathLike) -> TeacherVAE:
    """A teacher VAE of any family from its original file, a diffusers directory or a .safetensors file
    (or a student released in its authors' layout, e.g. ``Flash_VAED_Wan.pth``: a ``FlashStudent``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    tensors, config = read_checkpoint(path)
    try:
        match = families.detect(tensors, config, str(path))
    except CheckpointError as e:  # families read fields (metadata while detecting); the file is named here
        raise naming(path, e) from None
    family = match.family
    if match.student:
        return _load_released_student(match, tensors, config, path)  # type: ignore[return-value]
    try:
        cfg = family.infer_config(tensors, match.layout, config)
    except CheckpointError as e:
        raise naming(path, e) from None
    skip = family.config_tensor_keys(match.layout, tensors.keys())
    tensors = {k: v for k, v in tensors.items() if k not in skip}
    check_finite(tensors, path)
    model = build_checked(
        lambda: family.teacher_type(cfg),
        tensors,
        match.layout,
        lambda summary: f"{path} does not fit a {family.title} ({family.describe(cfg)}): {summary}",
    )
    return model  # type: ignore[return-value]


def _load_released_student(
    match: families.Match, tensors: dict[str, Tensor], config: dict[str, Any], path: Path
) -> FlashStudent:
    """A student released in its authors' layout (``flashvaed.models.released``), as our student."""
    student_config, ours = match.family.read_student(tensors, match.layout, config, str(path))
    check_finite(ours, path)
    try:
        return build_checked(  # type: ignore[return-value]
            lambda: FlashStudent(student_config),
            ours,
            "flashvaed",
            lambda summary: f"{path} does not fit the student its shapes describe: {summary}",
        )
    except (TypeError, ValueError) as e:  # a configuration the model refuses to be built from
        raise CheckpointError(f"{path}: its shapes describe no student this version builds ({e})") from None


def naming(path: str | os.PathLike, e: CheckpointError) -> CheckpointError:
    """``e`` saying which file it is about: family readers name fields, not the file they came from."""
    return e if str(path) in str(e) else CheckpointError(f"{path}: {e}")


# ---------------------------------------------------------------------------------------------
# writing files
# ---------------------------------------------------------------------------------------------
def save_teacher(model: TeacherVAE, path: str | os.PathLike, layout: str = "flashvaed") -> Path:
    """Write ``model`` in ``layout``: a .pth/.safetensors file, or a diffusers directory."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    family = families.get(model.family)
    path = Path(path)
    names = layout_names(model, layout)
    if len(set(names.values())) != len(names):
        raise AssertionError(f"{family.title} parameters share names in the {layout} layout")
    tensors = {names[k]: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(family.config_tensors(model.config, layout))
    if layout == "diffusers" and path.suffix != ".safetensors":
        try:
            config = family.diffusers_config(model.config)
        except CheckpointError as e:
            raise InputError(f"cannot write this {family.title} to {path.name} in the {layout} layout: {e}") from None
        _check_readable(model, tensors, config, layout, path)
        path.mkdir(parents=True, exist_ok=True)
        _write(path / DIFFUSERS_WEIGHTS, tensors)
        with atomic_output(path / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
        return path
    metadata = family.file_metadata(model.config, layout)
    if layout == "flashvaed":
        metadata = {"flashvaed.family": family.name, "flashvaed.config": json.dumps(model.config.to_dict())}
    _check_readable(model, tensors, (metadata or {}) if path.suffix == ".safetensors" else {}, layout, path)
    _write(path, tensors, metadata)
    return path


def _check_readable(model: TeacherVAE, tensors: dict[str, Tensor], described: dict, layout: str, path: Path) -> None:
    """Refuse to write what would not load back as ``model``: a file that cannot say its family's
    architecture (a .pth where the family needs metadata), or a config the loader reads otherwise."""
    family = families.get(model.family)
    where = f"cannot write this {family.title} to {path.name} in the {layout} layout"
    hint = "a diffusers directory's config.json or a .safetensors file's metadata says what a file's shapes cannot"
    try:
        match = families.detect(tensors, described, str(path))
        if (match.family.name, match.layout, match.student) != (family.name, layout, False):
            raise CheckpointError(f"it would read back as a {match.family.title} in the {match.layout} layout")
        back = family.infer_config(tensors, layout, described)
    except CheckpointError as e:
        raise InputError(f"{where}: {e} ({hint})") from None
    if as_stored(back.to_dict()) != as_stored(model.config.to_dict()):
        raise InputError(f"{where}: it would read back as another architecture, {family.describe(back)} ({hint})")


def as_stored(value: Any) -> Any:
    """``value`` as a checkpoint stores it: JSON types, floats as float32 tensors keep them (latent
    statistics are stored so)."""
    if isinstance(value, float):
        return float(torch.tensor(value, dtype=torch.float32))
    if isinstance(value, Mapping):
        return {k: as_stored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_stored(v) for v in value]
    return value


def _write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, str(tmp))


# ---------------------------------------------------------------------------------------------
# student directories: config.json + model.safetensors (+ prune_report.json, ...)
# ---------------------------------------------------------------------------------------------
def is_student_dir(path: Path) -> bool:
    return path.is_dir() and json_format(path / "config.json") == STUDENT_FORMAT


def load_student(path: str | os.PathLike) -> FlashStudent:
    path = Path(path)
    data = read_json(path / "config.json")
    if data.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path} is not a flashvaed student directory")
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}/config.json is malformed: version must be a format number, got {version!r:.60}")
    if version > STUDENT_VERSION:
        raise CheckpointError(f"{path} was written by a newer flashvaed (student format {version})")
    try:
        config = StudentConfig.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}/config.json is malformed: {e}") from None
    except CheckpointError as e:  # a field a family reader refused (an unknown family, a bad block)
        raise naming(path / "config.json", e) from None
    if not (path / STUDENT_WEIGHTS).is_file():
        raise CheckpointError(f"{path} has no {STUDENT_WEIGHTS}")
    tensors = read_tensors(path / STUDENT_WEIGHTS)
    check_finite(tensors, path / STUDENT_WEIGHTS)
    try:
        model = build_checked(
            lambda: FlashStudent(config),
            tensors,
            "flashvaed",
            lambda summary: f"{path}/{STUDENT_WEIGHTS} does not fit its config.json: {summary}",
        )
    except (TypeError, ValueError) as e:  # a layout the family cannot build
        raise CheckpointError(f"{path}/config.json is malformed: {e}") from None
    return model  # type: ignore[return-value]


def save_student(model: FlashStudent, out_dir: str | os.PathLike, extra: dict[str, object] | None = None) -> Path:
    """Write a student directory atomically: config.json, model.safetensors, and ``extra`` JSON files.

    An existing directory is replaced only if it is itself a student directory.
    """
    out_dir = Path(out_dir)
    with atomic_output(out_dir, directory=True, replaceable=is_student_dir, what=STUDENT_DIR) as tmp:
        write_student(model, tmp, extra)
    return out_dir


def write_student(model: FlashStudent, folder: Path, extra: dict[str, object] | None = None) -> None:
    """A student directory's files, into ``folder`` (one a caller is writing aside)."""
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / STUDENT_WEIGHTS))
    for name, content in (extra or {}).items():
        (folder / name).write_text(json.dumps(content, indent=2))


# ---------------------------------------------------------------------------------------------
# what a MODEL argument names
# ---------------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike) -> LatentDecoder:
    """Any model a MODEL argument may name, its format detected from the path."""
    if is_student_dir(Path(path)):
        return load_student(path)
    return load_vae(path)


def load_teacher(path: str | os.PathLike) -> TeacherVAE:
    """A teacher (a model with an encoder); a student directory is refused."""
    model = load_model(path)
    if not isinstance(model, TeacherVAE):
        raise InputError(
            f"{path} is a student; {{teacher}} needs a teacher checkpoint (original, diffusers, ...)", "teacher"
        )
    return model


def load_student_for(path: str | os.PathLike, teacher: TeacherVAE) -> FlashStudent:
    """The student directory at ``path``, refused unless it was made from a teacher like ``teacher``."""
    model = load_model(path)
    if not isinstance(model, FlashStudent):
        raise InputError(f"{path} is not a student directory (make one with `flashvaed prune`)")
    if model.family != teacher.family:
        raise InputError(f"the student is for {model.family} teachers, the teacher is {teacher.family}")
    mine, theirs = model.config.teacher, teacher.config
    if mine != theirs:
        describe = families.get(teacher.family).describe
        what = describe(mine) if describe(mine) != describe(theirs) else "other settings (e.g. latent statistics)"
        raise InputError(f"the student was pruned from a teacher with {what}; this teacher has {describe(theirs)}")
    return model
