"""The family contract (``flashvaed.models.contract``), for every registered family and for a family
defined only here: the contract checks, then the whole pipeline on the family's tiny teacher —
detect and load in every layout it writes, decode and stream, prune, export, the ONNX Runtime
engine, validate, FlashVAE. A new family is picked up by registering itself; nothing here names it.

The mutation tests break one contract member of the test-only family at a time (deleted, of the
wrong type, or lying) and expect a ``ContractError`` naming that member.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from flashvaed import api, engines
from flashvaed.errors import CheckpointError
from flashvaed.models import families, load_model, save_teacher
from flashvaed.models.blocks import CausalConv3d, Downsample, Head, ResidualBlock, Stage, Upsample
from flashvaed.models.checkpoint import load_vae
from flashvaed.models.contract import (
    DECODER_MEMBERS,
    FAMILY_MEMBERS,
    ContractError,
    check_decoder,
    check_family,
    frame_mixing,
    same_config,
    written_layouts,
)
from flashvaed.models.families.base import Family, Match, check_int, checked_statistics
from flashvaed.models.layout import DecoderLayout, StageLayout, channel_spaces
from flashvaed.models.streaming import State, StateSpec, StreamingBlock, run_blocks, zero_state
from flashvaed.models.student import preset_names
from flashvaed.models.vae import TeacherVAE

TOY = "contract-toy"


# ---------------------------------------------------------------------------------------------
# a family defined only here: a small causal decoder and encoder from the shared blocks
# (2x in time, 4x in space), its own configuration and its own "original" key names
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig:
    width: int = 8
    z_dim: int = 4
    latents_mean: tuple[float, ...] = (0.1, -0.2, 0.0, 0.3)
    latents_std: tuple[float, ...] = (0.5, 1.5, 0.75, 1.25)

    def __post_init__(self) -> None:
        check_int("width", self.width, 4, 1024)
        check_int("z_dim", self.z_dim, 1, 64)
        mean, std = checked_statistics(self.latents_mean, self.latents_std, self.z_dim)
        object.__setattr__(self, "latents_mean", mean)
        object.__setattr__(self, "latents_std", std)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def toy_layout(config: ToyConfig, name: str = TOY) -> DecoderLayout:
    w = config.width
    up = (
        StageLayout("causal3d", w, w, (w,), resample_width=w, temporal=2),
        StageLayout("causal3d", w, w, (w,), resample_width=w // 2),
        StageLayout("causal3d", w // 2, w // 2, (w // 2,)),
    )
    middle = StageLayout("causal3d", w, w, (w,))
    return DecoderLayout(config.z_dim, middle, up, 0, 0, family=name, spaces=channel_spaces(up, [False] * 3))


class ToyDecoder(nn.Module):
    def __init__(self, layout: DecoderLayout) -> None:
        super().__init__()
        self.layout = layout
        m = layout.middle
        self.conv_in = CausalConv3d(layout.z_dim, m.width, 3)
        self.middle = Stage([ResidualBlock(m.width, m.width, h, m.op, m.shortcut) for h in m.hidden])
        self.up = nn.ModuleList(
            Stage(
                [
                    ResidualBlock(st.in_width if j == 0 else st.width, st.width, h, st.op, st.shortcut)
                    for j, h in enumerate(st.hidden)
                ],
                Upsample(st.width, st.resample_width, st.temporal) if st.resample_width else None,
            )
            for st in layout.up
        )
        self.head = Head(layout.up[-1].width, layout.out_channels, layout.head_op)
        self.temporal_factor = 1
        for st in layout.up:
            self.temporal_factor *= st.temporal
        self.spatial_factor = 2 ** sum(st.resample_width is not None for st in layout.up)

    def stages(self) -> list[tuple[str, Fraction, StreamingBlock]]:
        items: list[tuple[str, Fraction, StreamingBlock]] = [("conv_in", Fraction(1), self.conv_in)]
        items.append(("middle", Fraction(1), self.middle))
        scale = Fraction(1)
        for i, stage in enumerate(self.up):
            items.append((f"up.{i}", scale, stage))
            scale *= 2 if stage.resample is not None else 1
        return [*items, ("head", scale, self.head)]

    def stage_ops(self) -> dict[str, str]:
        ops = {n: st.op for n, st in self.layout.stages.items()}
        return {"conv_in": "causal3d", **ops, "head": self.layout.head_op}

    def state_specs(self) -> list[StateSpec]:
        return [s for name, scale, block in self.stages() for s in block.state_specs(name, scale)]

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        return run_blocks([block for _, _, block in self.stages()], x, state, first)


class ToyEncoder(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        w = config.width
        self.conv_in = CausalConv3d(3, w, 3)
        self.down = nn.ModuleList(
            [Stage([ResidualBlock(w, w)], Downsample(w, True)), Stage([ResidualBlock(w, w)], Downsample(w, False))]
        )
        self.head = Head(w, 2 * config.z_dim)

    def blocks(self) -> list[tuple[str, Fraction, StreamingBlock]]:
        return [
            ("conv_in", Fraction(1), self.conv_in),
            ("down.0", Fraction(1), self.down[0]),
            ("down.1", Fraction(1, 2), self.down[1]),
            ("head", Fraction(1, 4), self.head),
        ]

    def iter_encode(self, video: Tensor) -> Iterator[Tensor]:
        b, _, t, h, w = video.shape
        p = next(self.parameters())
        specs = [s for name, scale, block in self.blocks() for s in block.state_specs(name, scale)]
        state = zero_state(specs, b, h, w, dtype=p.dtype, device=p.device)
        for start, stop in [(0, 1)] + [(s, s + 2) for s in range(1, t, 2)]:
            out, state = run_blocks([blk for _, _, blk in self.blocks()], video[:, :, start:stop], state, start == 0)
            yield out


class ToyFamily(Family):
    name: ClassVar[str] = TOY
    title: ClassVar[str] = "contract-test VAE"
    diffusers_vae: ClassVar[str] = "AutoencoderKLContractToy"
    pipelines: ClassVar[str] = "no diffusers pipelines (a family of the conformance test)"
    pipeline_reads: ClassVar[tuple[str, ...]] = ("config.latent_channels", "config.scaling_factor")
    config_type: ClassVar[type] = ToyConfig
    default_resolution: ClassVar[tuple[int, int]] = (64, 96)
    clip_frames: ClassVar[int] = 5
    order: ClassVar[int] = 1000
    prefix: ClassVar[str] = "toy_vae."  # the "original" layout: every name under this prefix

    def layouts_present(self, keys: Collection[str]) -> dict[str, str]:
        original = next((k for k in sorted(keys) if k.startswith(self.prefix)), None)
        return {"original": original} if original else {}

    def detect(self, keys: Collection[str], tensors: Mapping[str, Tensor], config: Mapping) -> list[Match]:
        if f"{self.prefix}decoder.head.conv.weight" in keys:
            return [Match(self, "original", f"{self.prefix}decoder.head.conv.weight")]
        if config.get("flashvaed.family") == self.name and "decoder.head.conv.weight" in keys:
            return [Match(self, "flashvaed", f"flashvaed.family metadata: {self.name}")]
        return []

    def infer_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> ToyConfig:
        raw = config.get("flashvaed.config" if layout == "flashvaed" else "toy_config")
        if not isinstance(raw, str):
            raise CheckpointError(f"a {self.title} checkpoint needs its configuration in the metadata")
        try:
            return ToyConfig.from_dict(json.loads(raw))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"inconsistent {self.title} configuration: {e}") from None

    def file_metadata(self, config: ToyConfig, layout: str) -> dict[str, str] | None:
        return {"toy_config": json.dumps(config.to_dict())} if layout == "original" else None

    def key_names(self, model: nn.Module, layout: str) -> dict[str, str]:
        if layout not in ("flashvaed", "original"):
            raise CheckpointError(f"{self.title} checkpoints have no {layout} layout")
        prefix = self.prefix if layout == "original" else ""
        return {k: prefix + k for k in model.state_dict()}

    def diffusers_config(self, config: ToyConfig) -> dict[str, Any]:
        return {"_class_name": self.diffusers_vae, **config.to_dict()}

    def describe(self, config: ToyConfig) -> str:
        return f"width {config.width}, z_dim {config.z_dim}"

    def tiny_config(self) -> ToyConfig:
        return ToyConfig()

    def scaling_factor(self, config: ToyConfig) -> float:
        return 0.5  # not 1: a de-normalisation that forgets it changes the frames

    def pipeline_fields(self, config: ToyConfig, model: Any) -> dict[str, Any]:
        return {"latent_channels": config.z_dim, "scaling_factor": self.scaling_factor(config)}

    def teacher_layout(self, config: ToyConfig) -> DecoderLayout:
        return toy_layout(config, self.name)

    def build_decoder(self, config: ToyConfig, layout: DecoderLayout, student: bool = False) -> nn.Module:
        return ToyDecoder(layout)

    def build_encoder(self, config: ToyConfig) -> nn.Module:
        return ToyEncoder(config)

    def build_post_quant_conv(self, config: ToyConfig) -> nn.Module:
        return nn.Conv3d(config.z_dim, config.z_dim, 1)

    def build_quant_conv(self, config: ToyConfig) -> nn.Module:
        return nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)


def make_toy(**overrides: Any) -> Family:
    """A fresh test-only family (its own class and teacher class), with members overridden."""
    family_cls = type("Toy", (ToyFamily,), {})
    family = family_cls()
    teacher_cls = type("ToyVAE", (TeacherVAE,), {"family_def": family})
    family_cls.teacher_type = teacher_cls
    for name, value in overrides.items():
        setattr(family_cls, name, value)
    return family


@contextmanager
def registered(family: Family) -> Iterator[Family]:
    """``family`` in the registry for the block (in place of any family of its name)."""
    name = family.name
    before = families.FAMILIES.get(name)
    families.FAMILIES.pop(name, None)
    families.register(family)
    try:
        yield family
    finally:
        families.FAMILIES.pop(name, None)
        if before is not None:
            families.register(before)


# ---------------------------------------------------------------------------------------------
# conformance: every registered family and the test-only one, through the whole pipeline
# ---------------------------------------------------------------------------------------------
NAMES = [*families.names(), TOY]


@pytest.fixture(scope="module", params=NAMES)
def world(request, tmp_path_factory):
    """The family (the test-only one registered for the module), its tiny teacher written in its own
    layout, latents of 5 frames at 2x3."""
    with registered(make_toy()) if request.param == TOY else _nothing():
        family = families.get(request.param)
        d = tmp_path_factory.mktemp(f"contract-{request.param}")
        torch.manual_seed(0)
        teacher = family.teacher_type(family.tiny_config()).eval()
        with torch.no_grad():  # random weights, frames mostly inside the clamp
            for p in teacher.parameters():
                p.mul_(0.7)
        save_teacher(teacher, d / "teacher.safetensors")
        # frames of at least 11x11 pixels (validate's SSIM window), 2x3 latents when the factor allows
        h = max(2, -(-11 // teacher.spatial_factor))
        z = torch.randn(1, teacher.latent_channels, 5, h, h + 1, generator=torch.Generator().manual_seed(1))
        torch.save({"latents": z}, d / "z.pt")
        yield World(family, teacher, d, z)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@dataclass
class World:
    family: Family
    teacher: TeacherVAE
    dir: Any
    latents: Tensor

    @property
    def sizes(self) -> tuple[int, int]:
        return self.teacher.temporal_factor, self.teacher.spatial_factor


def test_the_family_keeps_the_contract(world):
    check_family(world.family)
    check_decoder(world.teacher)
    assert frame_mixing(world.teacher) == [
        name for name, m in world.teacher.named_modules() if getattr(type(m), "mixes_frame", False)
    ]


def test_every_layout_it_writes_is_detected_and_loads_back(world):
    layouts = written_layouts(world.family, world.teacher)
    assert "flashvaed" in layouts
    expected = world.teacher.state_dict()
    for layout in layouts:
        path = world.dir / ("diffusers" if layout == "diffusers" else f"teacher-{layout}.safetensors")
        save_teacher(world.teacher, path, layout)
        back = load_vae(path)
        assert (back.family, type(back)) == (world.family.name, world.family.teacher_type), layout
        assert same_config(back.config, world.teacher.config), layout
        state = back.state_dict()
        assert set(state) == set(expected), layout
        assert all(torch.equal(state[k], v) for k, v in expected.items()), layout


def test_any_chunking_equals_one_shot(world):
    model, z = world.teacher, world.latents
    tf, sf = world.sizes
    with torch.no_grad():
        one_shot = model.decode(z)
        h, w = z.shape[-2:]
        assert one_shot.shape == (1, 3, 1 + 4 * tf, h * sf, w * sf)
        for chunk in (1, 2, 3):
            torch.testing.assert_close(model.decode(z, chunk), one_shot, atol=1e-5, rtol=0)
        stream = model.stream()
        pieces = [stream.push(z[:, :, a:b], final=b == 5) for a, b in ((0, 2), (2, 3), (3, 5))]
        pieces.append(stream.close())
        torch.testing.assert_close(torch.cat(pieces, dim=2), one_shot, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode_clip(z), one_shot, atol=1e-5, rtol=0)


def half_width_spec(family: Family, teacher: TeacherVAE) -> dict[str, Any]:
    """A uniform half-width student of the teacher's own operators, for a family without presets."""
    layout = family.teacher_layout(teacher.config)
    stages = {"middle": {"op": layout.middle.op, "width": 0.5, "hidden": 0.5}}
    stages.update({f"up{i}": {"op": st.op, "width": 0.5, "hidden": 0.5} for i, st in enumerate(layout.up)})
    return {"name": f"half-{family.name}", "family": family.name, "stages": stages, "min_width": 2, "multiple_of": 2}


@pytest.fixture(scope="module")
def pruned(world):
    presets = preset_names(world.family.name)
    options: dict[str, Any] = {}
    if f"flash-{world.family.name}" in presets:
        options["preset"] = f"flash-{world.family.name}"
    elif presets:
        options["preset"] = presets[0]
    else:
        (world.dir / "half.json").write_text(json.dumps(half_width_spec(world.family, world.teacher)))
        options["config"] = world.dir / "half.json"
    tf, sf = world.sizes
    frames = getattr(world.family, "clip_frames", 1 + 2 * tf)
    api.prune(
        world.dir / "teacher.safetensors", world.dir / "student", **options,
        calib_clips=1, calib_frames=frames, calib_size=2 * sf, height=4 * sf, width=4 * sf,
    )  # fmt: skip
    return world.dir / "student"


def test_prune(world, pruned):
    student = load_model(pruned)
    assert (student.family, student.kind) == (world.family.name, "student")
    assert sum(p.numel() for p in student.decoder.parameters()) < sum(
        p.numel() for p in world.teacher.decoder.parameters()
    )
    check_decoder(student)
    with torch.no_grad():
        frames = student.decode(world.latents)
    assert frames.shape == world.teacher.decode(world.latents).shape


@pytest.fixture(scope="module")
def engine(world, pruned):
    _, sf = world.sizes
    h, w = (sf * n for n in world.latents.shape[-2:])
    api.export(pruned, world.dir / "export", chunk="1:2:3", height=f"{sf}:{h}:{h}", width=f"{sf}:{w}:{w}", batch="1")
    api.build_engine(world.dir / "export", world.dir / "engine")
    return world.dir / "engine"


def test_export_and_onnx_runtime_engine_equal_torch(world, pruned, engine):
    student = load_model(pruned)
    with torch.no_grad():
        expected = student.decode(world.latents)
    decoder = engines.load(engine)
    assert decoder.contract.backend["name"] == "onnxruntime"
    for chunk in (1, 2, 3):
        torch.testing.assert_close(decoder.decode(world.latents, chunk=chunk), expected, atol=1e-4, rtol=0)
    report = api.validate(engine, pruned, world.dir / "z.pt", teacher=world.dir / "teacher.safetensors")
    assert report.passed, report.to_dict()


def test_flash_vae_decodes_what_the_model_decodes(world, pruned, engine):
    from flashvaed.diffusers import FlashVAE

    family, z = world.family, world.latents
    for source, model in ((engine, load_model(pruned)), (world.dir / "teacher.safetensors", world.teacher)):
        vae = FlashVAE.from_pretrained(source, teacher=world.dir / "teacher.safetensors", device="cpu")
        options = {"generator": torch.Generator().manual_seed(7)} if model.noise_scales else {}
        with torch.no_grad():
            expected = model.decode(z, **options)
        # what a pipeline passes: latents de-normalised by the family's statistics and scaling factor
        raw = z * model.latents_std / family.scaling_factor(world.teacher.config) + model.latents_mean
        torch.manual_seed(7)
        frames = vae.decode(raw).sample
        torch.testing.assert_close(frames, expected, atol=1e-4, rtol=0, msg=f"{family.name}: {source}")
        assert family.pipeline_fields(world.teacher.config, world.teacher).items() <= dict(vae.config).items()


def test_frame_mixing_names_wan_attention():
    wan = families.get("wan2.1")
    with torch.device("meta"):
        teacher = wan.teacher_type(wan.tiny_config())
    assert frame_mixing(teacher) == ["decoder.middle.blocks.1", "encoder.middle.blocks.1"]
    with torch.device("meta"):
        toy = make_toy().teacher_type(ToyConfig())
    assert frame_mixing(toy) == []


# ---------------------------------------------------------------------------------------------
# mutations of the test-only family: each member deleted, of the wrong type, or lying
# ---------------------------------------------------------------------------------------------
def _on_decoders(mutate: Callable[[nn.Module], None]) -> dict[str, Any]:
    """Overrides of a family whose decoders are mutated after they are built."""

    def build_decoder(self, config, layout, student=False):
        decoder = ToyDecoder(layout)
        mutate(decoder)
        return decoder

    return {"build_decoder": build_decoder}


def _set(name: str, value: Any) -> Callable[[nn.Module], None]:
    return lambda d: setattr(d, name, value)


def _wrap(name: str, change: Callable[[Any], Any]) -> Callable[[nn.Module], None]:
    def mutate(d: nn.Module) -> None:
        original = getattr(d, name)
        setattr(d, name, lambda *a, **k: change(original(*a, **k)))

    return mutate


def _forgetful(d: nn.Module) -> None:
    """A forward that ignores the state it is given: chunks no longer see the frames before them."""
    original = d.forward
    d.forward = lambda x, state, first=False, **kw: original(x, tuple(torch.zeros_like(s) for s in state), first, **kw)


def _stream_inputs(batch, height, width, **options):
    return {"timestep": torch.zeros(batch or 1)}


def _delete(name: str) -> Callable[[nn.Module], None]:
    return lambda d: delattr(d, name)


DECODER_MUTATIONS: dict[str, list[Callable[[nn.Module], None]]] = {
    "temporal_factor": [_delete("temporal_factor"), _set("temporal_factor", 2.5), _set("temporal_factor", 3)],
    "spatial_factor": [_set("spatial_factor", 0), _set("spatial_factor", 8)],
    "stages": [_set("stages", None), _wrap("stages", lambda s: s[:-1]), _wrap("stages", lambda s: s[::-1])],
    "stage_ops": [
        _wrap("stage_ops", lambda o: {k: v for k, v in o.items() if k != "head"}),
        _wrap("stage_ops", lambda o: {**o, "head": "warp3d"}),
    ],
    "state_specs": [
        _wrap("state_specs", lambda s: s[:-1]),
        _wrap("state_specs", lambda s: [dataclasses.replace(s[0], frames=3), *s[1:]]),
    ],
    "forward": [_forgetful, _set("forward", lambda x, state, first=False: (x, state))],
    "latency": [_set("latency", 1), _set("latency", -1)],
    "output_offset": [_set("output_offset", 1), _set("output_offset", "0")],
    "step_inputs": [_set("step_inputs", ("timestep",)), _set("step_inputs", ("seed",))],
    "stream_inputs": [_set("stream_inputs", _stream_inputs), _set("stream_inputs", 3)],
    "noise_scales": [_set("noise_scales", (Fraction(1),)), _set("noise_scales", (-1,))],
    "default_timestep": [_set("default_timestep", 0.05)],
    "default_noise_scale": [_set("default_noise_scale", 0.5)],
    "one_shot_context": [_set("one_shot_context", 3)],
    "channels_last": [_set("channels_last", "yes")],
}


def _lie(name: str, change: Callable[..., Any]) -> dict[str, Any]:
    """Override method ``name`` with one returning ``change(self, original result, *args)``."""
    original = getattr(ToyFamily, name)
    return {name: lambda self, *a, **k: change(self, original(self, *a, **k), *a)}


def _other_width(self, config, *a):
    return dataclasses.replace(config, width=config.width * 2)


def _bad_post_quant(self, config):
    return nn.Conv3d(config.z_dim, config.z_dim + 1, 1)


FAMILY_MUTATIONS: dict[str, list[dict[str, Any]]] = {
    "name": [{"name": 3}, {"name": "Not A Name"}],
    "title": [{"title": ""}],
    "diffusers_vae": [{"diffusers_vae": "not a class"}, {"diffusers_vae": None}],
    "config_type": [{"config_type": dict}],
    "teacher_type": [{"teacher_type": nn.Module}],
    "default_resolution": [{"default_resolution": (62, 96)}, {"default_resolution": [64, 96]}],
    "ops": [{"ops": ("causal3d", "warp3d")}, {"ops": ("spatial2d",)}],
    "embedded_teacher": [{"embedded_teacher": "missing.safetensors"}, {"embedded_teacher": "wan21-tiny.safetensors"}],
    "clip_frames": [{"clip_frames": 4}, {"clip_frames": True}],
    "pipelines": [{"pipelines": 5}],
    "pipeline_reads": [{"pipeline_reads": ["config.scaling_factor"]}, {"pipeline_reads": ("config.",)}],
    "order": [{"order": -1}, {"order": 1.5}],
    "layouts_present": [_lie("layouts_present", lambda s, r, keys: {"original": "x", "flashvaed": "y"})],
    "detect": [_lie("detect", lambda s, r, *a: []), _lie("detect", lambda s, r, *a: r + r)],
    "infer_config": [_lie("infer_config", lambda s, r, *a: dataclasses.replace(r, width=16))],
    "config_tensor_keys": [_lie("config_tensor_keys", lambda s, r, *a: {"bogus"})],
    "config_tensors": [
        _lie("config_tensors", lambda s, r, *a: {"decoder.conv_in.weight": torch.zeros(1)}),
        _lie("config_tensors", lambda s, r, *a: {"stats": [1.0]}),
    ],
    "file_metadata": [_lie("file_metadata", lambda s, r, *a: {"toy_config": 1})],
    "read_student": [{"read_student": None}],
    "key_names": [
        _lie("key_names", lambda s, r, *a: dict(list(r.items())[1:])),
        _lie("key_names", lambda s, r, *a: dict.fromkeys(r, "same")),
    ],
    "diffusers_config": [_lie("diffusers_config", lambda s, r, *a: [])],
    "describe": [_lie("describe", lambda s, r, *a: "")],
    "tiny_config": [_lie("tiny_config", lambda s, r: r.to_dict())],
    "config_from_dict": [_lie("config_from_dict", _other_width)],
    "scaling_factor": [_lie("scaling_factor", lambda s, r, *a: 0.0), _lie("scaling_factor", lambda s, r, *a: "1")],
    "pipeline_fields": [
        _lie("pipeline_fields", lambda s, r, *a: []),
        _lie("pipeline_fields", lambda s, r, *a: {**r, "unlisted": 1}),
    ],
    "teacher_layout": [_lie("teacher_layout", lambda s, r, *a: dataclasses.replace(r, family=None))],
    "upgrade_student_layout": [_lie("upgrade_student_layout", lambda s, r, *a: None)],
    "build_decoder": [_lie("build_decoder", lambda s, r, *a, **k: None)],
    "build_encoder": [_lie("build_encoder", lambda s, r, *a: nn.Identity())],
    "build_post_quant_conv": [{"build_post_quant_conv": _bad_post_quant}],
    "build_quant_conv": [_lie("build_quant_conv", lambda s, r, *a: None)],
}


def test_every_member_has_mutations():
    assert set(FAMILY_MUTATIONS) == set(FAMILY_MEMBERS)
    assert set(DECODER_MUTATIONS) == set(DECODER_MEMBERS)


def test_the_unmutated_test_family_passes():
    with registered(make_toy()) as family:
        check_family(family)


def _expect_named(member: str, overrides: dict[str, Any]) -> None:
    family = make_toy(**overrides)
    with registered(family) if isinstance(family.name, str) and "Not" not in family.name else _nothing():
        with pytest.raises(ContractError) as e:
            check_family(family)
    assert e.value.member == member, str(e.value)
    assert f"member {member}:" in str(e.value)


@pytest.mark.parametrize(
    "member, overrides",
    [(m, o) for m, options in FAMILY_MUTATIONS.items() for o in options],
    ids=[f"{m}-{i}" for m, options in FAMILY_MUTATIONS.items() for i in range(len(options))],
)
def test_a_family_member_mutated_is_named(member, overrides):
    _expect_named(member, overrides)


@pytest.mark.parametrize(
    "member, mutate",
    [(m, f) for m, options in DECODER_MUTATIONS.items() for f in options],
    ids=[f"{m}-{i}" for m, options in DECODER_MUTATIONS.items() for i in range(len(options))],
)
def test_a_decoder_member_mutated_is_named(member, mutate):
    _expect_named(member, _on_decoders(mutate))
    decoder = ToyDecoder(toy_layout(ToyConfig()))  # and the decoder checked alone
    mutate(decoder)
    with pytest.raises(ContractError, match=f"member {member}:"):
        check_decoder(decoder, latent_channels=4)


@pytest.mark.parametrize("dropped", ["position", "end", "full", "clip_only"])
def test_a_clocked_decoder_must_take_every_clock_input(dropped):
    """A decoder with latency runs on a clock: streams pass ``position`` and ``end``, one-shot
    decoding ``full``, an export's flush graph ``clip_only``. A forward without one of them is
    refused before any step, naming it."""
    fam = families.get("ltx")
    model = fam.teacher_type(fam.tiny_config()).eval()
    check_decoder(model)
    real = model.decoder.forward
    names = [n for n in ("position", "end", "full", "clip_only") if n != dropped]

    def forward(x, state, first=False, **clock):  # keyword-only inputs, but not **kwargs: see below
        return real(x, state, first, **clock)

    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    forward.__signature__ = inspect.signature(
        forward
    ).replace(  # type: ignore[attr-defined]
        parameters=[*list(inspect.signature(forward).parameters.values())[:3], *params]
    )
    model.decoder.forward = forward
    with pytest.raises(ContractError, match=f"member latency:.*its forward takes no {dropped}"):
        check_decoder(model)
