"""The family contract, written down and checked: what a family module provides and what the
decoder it builds exposes, so that everything downstream (prune, distill, export, engines,
validate, the diffusers drop-in) can ask the model and never a family's name.

``Family`` (below, a ``Protocol``) is what ``families.base.Family`` subclasses fill in;
``Decoder`` is the module ``Family.build_decoder`` returns. ``LatentDecoder`` (``vae.py``) wraps the
decoder and copies its facts; members a decoder may leave out take the defaults in
``DECODER_DEFAULTS``.

``check_family(family)`` and ``check_decoder(model)`` check the contract by behaviour, not by
``hasattr``: types and ranges, a step's state tensors against ``state_specs``, the frames a chunk
gives against the factors, stage names against submodules, any chunking against one-shot
decoding, configurations and checkpoints written and read back. Each raises ``ContractError``
naming the member: ``family 'wan2.1': member temporal_factor: must be an integer >= 1, got 2.5``.
The conformance test (tests/test_contract.py) runs both over every registered family and then the
whole pipeline; docs/architecture.md has the checklist for adding a family.

``frame_mixing(model)`` lists the modules that mix information across a whole frame (their class
sets ``mixes_frame = True``: an attention over a frame's positions, per-frame group statistics),
which exact spatial tiling must compute on the whole frame.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fractions import Fraction
from importlib import resources
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .layout import DecoderLayout
from .streaming import State, StateSpec, zero_state

__all__ = [
    "DECODER_DEFAULTS",
    "DECODER_MEMBERS",
    "FAMILY_MEMBERS",
    "STEP_INPUTS",
    "ContractError",
    "Decoder",
    "Family",
    "StageBlock",
    "check_decoder",
    "check_family",
    "frame_mixing",
    "named_layouts",
    "same_config",
    "written_layouts",
]

STEP_INPUTS = ("timestep", "noise")  # the extra step inputs exports and engines know how to feed
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")
TOLERANCE = 1e-4  # chunked vs one-shot decoding, relative to the frames' largest magnitude (float32)


class ContractError(ValueError):
    """A family or decoder breaks the contract; ``member`` names what is wrong."""

    def __init__(self, owner: str, member: str, problem: str) -> None:
        self.owner, self.member, self.problem = owner, member, problem
        super().__init__(f"{owner}: member {member}: {problem}"[:600])


# ---------------------------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class StageBlock(Protocol):
    """One stage of a decoder (``Decoder.stages``): a streaming block over its slice of the state.

    Distillation runs a stage alone (``forward(x, state, first[, context])``, the context from
    ``Decoder.one_shot_context`` for decoders on a clock), hooks its calls (input ``args[0]``,
    output ``out[0]``) and checkpoints it; pruning walks its ``channel_flow``; cost reports sum its
    parameters and the state tensors named after it.
    """

    num_states: int  # how many state tensors it owns (a structural constant)

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        """Its state tensors, named ``name`` or ``name.<part>``, at spatial ``scale`` of the latent grid."""
        ...

    def channel_flow(self, flow: Any, path: str, stage: str, stream: Any) -> Any:
        """Its channel coupling (``coupling.ChannelFlow``): what pruning keeps consistent."""
        ...


@runtime_checkable
class Decoder(Protocol):
    """What ``Family.build_decoder`` returns: a pure streaming step over latents (after
    ``post_quant_conv``) and the facts every later stage reads.

    Required:

    - ``temporal_factor``: output frames per latent frame (int >= 1). A causal decoder's first chunk
      (one latent frame, ``first=True``) gives 1 frame, every later chunk of k latent frames
      ``temporal_factor * k``; a decoder on a clock maps every chunk of k to ``temporal_factor * k``
      output positions.
    - ``spatial_factor``: output pixels per latent pixel along each side (int >= 1).
    - ``stages()``: ``[(name, scale, block)]`` in the order ``forward`` runs them, each block once
      per step; ``name`` is the block's path in the decoder (``decoder.get_submodule(name)``),
      ``scale`` (a positive ``Fraction``) the spatial size of its input relative to the latent
      grid, ``block`` a ``StageBlock``. Every parameter belongs to one stage.
    - ``stage_ops()``: stage name -> registered operator kind (``blocks.OPS``), for every stage.
    - ``state_specs()``: the state tensors, in order: the stages' ``state_specs(name, scale)``
      concatenated, one per state tensor a step takes and returns, shapes as ``StateSpec.shape``.
    - ``forward(x, state, first=False, **inputs) -> (frames, state)``: one step. ``x`` is
      (B, z, k, h, w), ``state`` the tuple ``state_specs`` describes (zeros before the first
      chunk), ``frames`` (B, 3, n, h * spatial_factor, w * spatial_factor). ``inputs`` are the
      ``step_inputs`` and, on a clock, ``position`` (latent frames before this chunk), ``end``
      (the clip's length once known, else None), ``full`` (True: ``x`` is the whole clip,
      ``state`` is empty, the result is exactly the clip's frames: one-shot decoding) and
      ``clip_only`` (True: ``frames`` are only the step's positions that hold frames of the clip,
      not all ``temporal_factor * k``; an export's ``flush`` graph asks for that).

    Optional (``DECODER_DEFAULTS`` when absent):

    - ``latency``: latent frames a step holds back (int >= 0; 0: causal). The stream pushes this
      many more after the clip's last one (``close()``). Exactly the fewest that bring out the
      clip's last frame: ``max(0, ceil((output_offset + 1) / temporal_factor) - 1)``.
    - ``output_offset``: output positions before the clip's first frame (int >= 0). Nonzero latency
      or offset puts the decoder on a clock (``streaming.clocked``).
    - ``step_inputs``: names of extra per-stream step inputs, a subset of ``STEP_INPUTS``.
    - ``stream_inputs(batch, height, width, *, dtype, device, **options) -> dict``: those inputs for
      one stream from its options (a timestep, a seed); required when ``step_inputs`` is not empty,
      and it makes exactly them. ``batch=None`` only checks the options.
    - ``noise_scales``: one positive ``Fraction`` per injected noise map (its grid relative to the
      latent grid); non-empty exactly when ``"noise"`` is a step input.
    - ``default_timestep``: the pipeline's decode timestep; a float exactly when ``"timestep"``
      is a step input.
    - ``default_noise_scale``: the pipeline's decode-time latent noise in [0, 1] (timestep-conditioned
      decoders only).
    - ``one_shot_context(batch, height, width, seed=0)``: for a decoder on a clock, the context its
      stages take when one runs alone on a whole clip (distillation's teacher-forced phase).
    - ``channels_last``: its eager steps run channels-last where ``blocks.to_channels_last`` does
      (a bool): a stream then starts its state in that layout (``blocks.state_format``).
    """

    temporal_factor: int
    spatial_factor: int

    def stages(self) -> list[tuple[str, Fraction, nn.Module]]: ...

    def stage_ops(self) -> dict[str, str]: ...

    def state_specs(self) -> list[StateSpec]: ...

    def forward(self, x: Tensor, state: State, first: bool = False, **inputs: Any) -> tuple[Tensor, State]: ...


DECODER_DEFAULTS: dict[str, Any] = {
    "latency": 0,
    "output_offset": 0,
    "step_inputs": (),
    "stream_inputs": None,
    "noise_scales": (),
    "default_timestep": None,
    "default_noise_scale": None,
    "one_shot_context": None,
    "channels_last": False,
}
DECODER_REQUIRED = ("temporal_factor", "spatial_factor", "stages", "stage_ops", "state_specs", "forward")
DECODER_MEMBERS = DECODER_REQUIRED + tuple(DECODER_DEFAULTS)


# ---------------------------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class Family(Protocol):
    """What a family module registers (``families.base.Family`` holds the defaults).

    Class attributes: ``name`` (registry key, lower case: ``"wan2.1"``), ``title`` (for messages),
    ``diffusers_vae`` (the diffusers class its checkpoints load into, ``config.json``'s
    ``_class_name``), ``config_type`` (a frozen dataclass with ``to_dict``/``from_dict``),
    ``teacher_type`` (its ``TeacherVAE`` subclass, whose ``family_def`` is the family),
    ``default_resolution`` ((height, width) pixels for MACs reports, multiples of the spatial
    factor), ``ops`` (the registered operator kinds its decoders build, the teacher's included),
    ``embedded_teacher`` (a file in flashvaed/data the demo runs on, or None), ``clip_frames``
    (calibration and distillation clip length: 1 + n * temporal_factor), ``pipelines`` (the
    diffusers pipelines that take its VAE, for messages).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    diffusers_vae: ClassVar[str]
    config_type: ClassVar[type]
    teacher_type: ClassVar[type]
    default_resolution: ClassVar[tuple[int, int]]
    ops: ClassVar[tuple[str, ...]]
    embedded_teacher: ClassVar[str | None]
    clip_frames: ClassVar[int]
    pipelines: ClassVar[str]

    # recognising and reading checkpoints
    def layouts_present(self, keys: Collection[str]) -> dict[str, str]:
        """Layout -> a key in its naming, for every layout of this family the keys use (at most one
        in a well-formed checkpoint; the registry refuses mixtures)."""
        ...

    def detect(self, keys: Collection[str], tensors: Mapping[str, Tensor], config: Mapping) -> list[Any]:
        """``families.Match`` for every layout of this family the checkpoint is in (one for its own)."""
        ...

    def infer_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> Any:
        """The configuration of a checkpoint: what it was written from."""
        ...

    def config_tensor_keys(self, layout: str, keys: Collection[str]) -> set[str]:
        """Checkpoint tensors that hold configuration, not weights (a subset of ``keys``)."""
        ...

    def config_tensors(self, config: Any, layout: str) -> dict[str, Tensor]:
        """Configuration tensors written beside the weights (no weight's name)."""
        ...

    def file_metadata(self, config: Any, layout: str) -> dict[str, str] | None:
        """Safetensors metadata of a single file in ``layout`` (str -> str), or None."""
        ...

    def read_student(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping, where: str) -> tuple[Any, dict]:
        """A released student's ``StudentConfig`` and parameters (``Match.student``)."""
        ...

    def key_names(self, model: nn.Module, layout: str) -> dict[str, str]:
        """Our name -> its name in ``layout``, for every entry of the state dict, one to one. A
        layout the family does not write raises (``CheckpointError``/``KeyError``)."""
        ...

    def diffusers_config(self, config: Any) -> dict[str, Any]:
        """config.json of its diffusers class (JSON, ``_class_name`` = ``diffusers_vae``)."""
        ...

    def describe(self, config: Any) -> str:
        """A few numbers that tell two teachers apart, for messages."""
        ...

    # building
    def tiny_config(self) -> Any:
        """The smallest teacher configuration that still exercises the family's features."""
        ...

    def config_from_dict(self, d: Mapping[str, Any]) -> Any:
        """``config_type.from_dict`` of a mapping (ValueError if malformed)."""
        ...

    def scaling_factor(self, config: Any) -> float:
        """The latent scaling factor of its pipelines (> 0; 1.0 for most)."""
        ...

    def pipeline_fields(self, config: Any, model: Any) -> dict[str, Any]:
        """The config fields its diffusers pipelines read from their VAE (``FlashVAE.config``)."""
        ...

    def teacher_layout(self, config: Any) -> DecoderLayout:
        """The teacher decoder's layout (``family`` = the family's name, ``z_dim`` its latent channels)."""
        ...

    def upgrade_student_layout(self, layout: dict[str, Any], version: int) -> dict[str, Any]:
        """A student layout written by an older flashvaed, as this version reads it."""
        ...

    def build_decoder(self, config: Any, layout: DecoderLayout, student: bool = False) -> nn.Module:
        """A ``Decoder`` for ``layout``."""
        ...

    def build_encoder(self, config: Any) -> nn.Module:
        """The encoder: ``iter_encode(video)`` yields its output per chunk of frames."""
        ...

    def build_post_quant_conv(self, config: Any) -> nn.Module:
        """Latents -> decoder input, same shape."""
        ...

    def build_quant_conv(self, config: Any) -> nn.Module:
        """Encoder output -> (mean, log-variance) channels (at least z)."""
        ...


FAMILY_ATTRIBUTES = (
    "name", "title", "diffusers_vae", "config_type", "teacher_type", "default_resolution", "ops",
    "embedded_teacher", "clip_frames", "pipelines", "pipeline_reads", "order",
)  # fmt: skip
FAMILY_METHODS = (
    "layouts_present", "detect", "infer_config", "config_tensor_keys", "config_tensors", "file_metadata",
    "read_student", "key_names", "diffusers_config", "describe", "tiny_config", "config_from_dict",
    "scaling_factor", "pipeline_fields", "teacher_layout", "upgrade_student_layout", "build_decoder",
    "build_encoder", "build_post_quant_conv", "build_quant_conv",
)  # fmt: skip
FAMILY_MEMBERS = FAMILY_ATTRIBUTES + FAMILY_METHODS


# ---------------------------------------------------------------------------------------------
# frame-wide operations
# ---------------------------------------------------------------------------------------------
def frame_mixing(model: nn.Module) -> list[str]:
    """Paths of the modules of ``model`` whose class sets ``mixes_frame = True``: each output
    position reads the whole frame (attention over a frame's positions, per-frame group
    statistics), so tiles or bands of a frame cannot compute it from a halo alone."""
    return [name for name, m in model.named_modules() if getattr(type(m), "mixes_frame", False) is True]


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    return repr(value)[:80]


def _is_int(value: Any, lo: int = 0) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= lo


class _Checker:
    def __init__(self, owner: str) -> None:
        self.owner = owner

    def fail(self, member: str, problem: str) -> ContractError:
        return ContractError(self.owner, member, problem)

    @contextmanager
    def calling(self, member: str) -> Iterator[None]:
        """Run a member; anything it raises (other than a contract error) is blamed on it."""
        try:
            yield
        except ContractError:
            raise
        except Exception as e:  # the member's own failure, whatever its kind
            raise self.fail(member, f"raised {type(e).__name__}: {e}") from e

    def member(self, obj: Any, name: str, default: Any = ...) -> Any:
        if default is ... and not hasattr(obj, name):
            raise self.fail(name, "missing (required by the contract, see flashvaed.models.contract)")
        return getattr(obj, name, default)

    def method(self, obj: Any, name: str) -> Callable[..., Any]:
        fn = self.member(obj, name)
        if not callable(fn):
            raise self.fail(name, f"must be a method, got {type(fn).__name__}")
        return fn


def _owner_of(model: nn.Module, owner: str | None) -> str:
    if owner is not None:
        return owner
    family = getattr(model, "family", None)
    return f"family {family!r}" if isinstance(family, str) else f"decoder {type(model).__name__}"


def check_decoder(
    model: nn.Module,
    *,
    latent_channels: int | None = None,
    owner: str | None = None,
    size: tuple[int, int] = (2, 3),
    frames: int = 3,
) -> None:
    """Check a decoder against the contract (``Decoder``), by running it.

    ``model``: a ``LatentDecoder`` (teacher or student; its ``decoder`` is checked) or a decoder
    module itself (then ``latent_channels``, or its ``layout.z_dim``, says what it reads). Steps
    run on random latents of ``frames`` latent frames at ``size`` (latent h, w), in the model's
    dtype and device, without autograd. Raises ``ContractError`` naming the first member at fault.
    """
    decoder = getattr(model, "decoder", None)
    decoder = decoder if isinstance(decoder, nn.Module) and decoder is not model else model
    c = _Checker(_owner_of(model, owner))
    if latent_channels is None:
        latent_channels = getattr(model, "latent_channels", None)
    if latent_channels is None:
        latent_channels = getattr(getattr(decoder, "layout", None), "z_dim", None)
    if not _is_int(latent_channels, 1):
        raise TypeError("check_decoder needs latent_channels for a decoder without a layout")
    facts = _decoder_facts(c, decoder)
    _check_stages(c, decoder, facts)
    with torch.no_grad():
        _check_steps(c, decoder, facts, latent_channels, size, frames)


CLOCK_INPUTS = ("position", "end", "full", "clip_only")  # what a decoder on a clock's forward takes


def _decoder_facts(c: _Checker, decoder: nn.Module) -> dict[str, Any]:
    """Types and ranges of every member, and how they agree with each other."""
    if not isinstance(decoder, nn.Module):
        raise c.fail("build_decoder", f"returned {type(decoder).__name__}, not a torch module")
    facts: dict[str, Any] = {}
    for name in ("temporal_factor", "spatial_factor"):
        value = c.member(decoder, name)
        if not _is_int(value, 1):
            raise c.fail(name, f"must be an integer >= 1, got {_show(value)}")
        facts[name] = value
    for name in ("stages", "stage_ops", "state_specs", "forward"):
        c.method(decoder, name)
    channels_last = c.member(decoder, "channels_last", DECODER_DEFAULTS["channels_last"])
    if not isinstance(channels_last, bool):
        raise c.fail("channels_last", f"must be a bool, got {_show(channels_last)}")
    for name in ("latency", "output_offset"):
        value = c.member(decoder, name, DECODER_DEFAULTS[name])
        if not _is_int(value, 0):
            raise c.fail(name, f"must be an integer >= 0, got {_show(value)}")
        facts[name] = value
    tf, offset = facts["temporal_factor"], facts["output_offset"]
    fewest = max(0, -(-(offset + 1) // tf) - 1)
    if facts["latency"] != fewest:
        raise c.fail(
            "latency",
            f"is {facts['latency']}, but with output_offset {offset} and temporal_factor {tf} the clip's last "
            f"frame comes out {fewest} latent frames after the last one",
        )
    facts["clocked"] = bool(facts["latency"] or offset)
    if facts["clocked"]:
        params = inspect.signature(decoder.forward).parameters
        kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [n for n in CLOCK_INPUTS if n not in params and not kwargs]
        if missing:
            blamed = "latency" if facts["latency"] else "output_offset"
            raise c.fail(
                blamed,
                f"is {facts[blamed]}: the decoder runs on a clock, but its forward takes no {', '.join(missing)}",
            )
    step_inputs = c.member(decoder, "step_inputs", DECODER_DEFAULTS["step_inputs"])
    if not isinstance(step_inputs, (tuple, list)) or not all(isinstance(s, str) for s in step_inputs):
        raise c.fail("step_inputs", f"must be a tuple of names, got {_show(step_inputs)}")
    unknown = [s for s in step_inputs if s not in STEP_INPUTS]
    if unknown or len(set(step_inputs)) != len(step_inputs):
        raise c.fail(
            "step_inputs", f"must name distinct inputs among {', '.join(STEP_INPUTS)}, got {list(step_inputs)}"
        )
    facts["step_inputs"] = tuple(step_inputs)
    make = c.member(decoder, "stream_inputs", DECODER_DEFAULTS["stream_inputs"])
    if step_inputs and make is None:
        raise c.fail("step_inputs", f"names {list(step_inputs)}, but the decoder has no stream_inputs() to make them")
    if make is not None and not callable(make):
        raise c.fail("stream_inputs", f"must be a method, got {type(make).__name__}")
    facts["stream_inputs"] = make
    scales = c.member(decoder, "noise_scales", DECODER_DEFAULTS["noise_scales"])
    if not isinstance(scales, (tuple, list)) or not all(
        isinstance(s, numbers.Rational) and not isinstance(s, bool) and s > 0 for s in scales
    ):
        raise c.fail("noise_scales", f"must be a list of positive fractions, got {_show(scales)}")
    if bool(scales) != ("noise" in step_inputs):
        raise c.fail(
            "noise_scales",
            f"declares {len(scales)} noise maps, but step_inputs {'names' if 'noise' in step_inputs else 'lacks'} "
            "'noise' (noise maps are a step input exactly when there are some)",
        )
    facts["noise_scales"] = tuple(Fraction(s) for s in scales)
    timestep = c.member(decoder, "default_timestep", None)
    conditioned = "timestep" in step_inputs
    if timestep is not None and (
        isinstance(timestep, bool) or not isinstance(timestep, numbers.Real) or not math.isfinite(timestep)
    ):
        raise c.fail("default_timestep", f"must be a finite number or None, got {_show(timestep)}")
    if (timestep is not None) != conditioned:
        raise c.fail(
            "default_timestep",
            f"is {timestep!r}: a decoder taking a timestep has a default one, any other has None",
        )
    noise = c.member(decoder, "default_noise_scale", None)
    if noise is not None and (
        isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise <= 1 or not conditioned
    ):
        raise c.fail(
            "default_noise_scale", f"must be None or, for a timestep-conditioned decoder, in [0, 1]; got {_show(noise)}"
        )
    one_shot = c.member(decoder, "one_shot_context", None)
    if one_shot is not None and not callable(one_shot):
        raise c.fail("one_shot_context", f"must be a method, got {type(one_shot).__name__}")
    facts["one_shot_context"] = one_shot
    return facts


def _check_stages(c: _Checker, decoder: nn.Module, facts: dict[str, Any]) -> None:
    """stages(), stage_ops() and state_specs() against the modules and each other."""
    with c.calling("stages"):
        stages = decoder.stages()
    if not isinstance(stages, (list, tuple)) or not stages:
        raise c.fail("stages", f"must return a non-empty list of (name, scale, block), got {_show(stages)}")
    names: list[str] = []
    owned: set[str] = set()
    specs_of_stages: list[StateSpec] = []
    for item in stages:
        if not (isinstance(item, tuple) and len(item) == 3):
            raise c.fail("stages", f"entries are (name, scale, block), got {_show(item)}")
        name, scale, block = item
        if not isinstance(name, str) or name in names:
            raise c.fail("stages", f"names must be distinct strings, got {_show(name)}")
        names.append(name)
        try:
            found = decoder.get_submodule(name)
        except AttributeError:
            found = None
        if found is not block:
            raise c.fail("stages", f"stage {name!r} is not the decoder's submodule {name!r}")
        if not isinstance(scale, numbers.Rational) or isinstance(scale, bool) or not scale > 0:
            raise c.fail("stages", f"stage {name!r} has scale {_show(scale)}, not a positive fraction")
        n = getattr(block, "num_states", None)
        if not _is_int(n, 0):
            raise c.fail("stages", f"stage {name!r}: num_states must be an integer >= 0, got {_show(n)}")
        for method in ("state_specs", "channel_flow"):
            if not callable(getattr(block, method, None)):
                raise c.fail("stages", f"stage {name!r} has no {method}() (see contract.StageBlock)")
        with c.calling("stages"):
            specs = list(block.state_specs(name, Fraction(scale)))
        if len(specs) != n:
            raise c.fail("stages", f"stage {name!r} declares {n} states but its state_specs() gives {len(specs)}")
        if any(s.name != name and not s.name.startswith(f"{name}.") for s in specs):
            raise c.fail("stages", f"stage {name!r} has state specs named outside it: {[s.name for s in specs]}")
        specs_of_stages += specs
        owned |= {f"{name}.{p}" for p, _ in block.named_parameters()}
    owned |= {p for p, _ in decoder.named_parameters(recurse=False)}  # decoder-wide (LTX's timestep scale)
    stray = sorted({p for p, _ in decoder.named_parameters()} - owned)
    if stray:
        raise c.fail("stages", f"parameters of submodules outside every stage: {', '.join(stray[:3])}")
    facts["stages"] = [(name, Fraction(scale), block) for name, scale, block in stages]

    from .blocks import OPS

    with c.calling("stage_ops"):
        ops = decoder.stage_ops()
    if not isinstance(ops, Mapping) or set(ops) != set(names):
        shown = sorted(ops) if isinstance(ops, Mapping) else _show(ops)
        raise c.fail("stage_ops", f"must map every stage ({', '.join(names)}) to its operator kind, got {shown}")
    bad = {k: v for k, v in ops.items() if v not in OPS}
    if bad:
        raise c.fail("stage_ops", f"names operators that are not registered: {bad} (known: {', '.join(OPS)})")
    facts["stage_ops"] = dict(ops)

    with c.calling("state_specs"):
        specs = decoder.state_specs()
    if not isinstance(specs, (list, tuple)) or not all(isinstance(s, StateSpec) for s in specs):
        raise c.fail("state_specs", f"must return a list of StateSpec, got {_show(specs)}")
    if list(specs) != specs_of_stages:
        theirs, ours = [s.name for s in specs], [s.name for s in specs_of_stages]
        raise c.fail(
            "state_specs",
            f"must be the stages' state specs in order: {len(specs)} given ({theirs[:4]}...), the stages declare "
            f"{len(specs_of_stages)} ({ours[:4]}...)"
            if theirs != ours
            else "must be the stages' state specs in order: the names agree, the shapes do not",
        )
    for s in specs:
        if not (_is_int(s.channels, 1) and _is_int(s.frames, 1) and s.scale > 0):
            raise c.fail("state_specs", f"{s.name}: channels and frames must be >= 1 and the scale positive, got {s}")
    if len({s.name for s in specs}) != len(specs):
        raise c.fail("state_specs", "state tensor names must be distinct")
    facts["specs"] = list(specs)

    from ..prune.groups import channel_graph

    with c.calling("stages"):  # the channel flow pruning walks: every layer it names is the decoder's
        graph = channel_graph(decoder, prefix="")
    for g in graph.groups:
        for path in [p for p, _ in g.producers] + list(g.consumers):
            try:
                decoder.get_submodule(path.removeprefix("."))
            except AttributeError:
                raise c.fail("stages", f"the channel flow of the stages names {path!r}, not a layer") from None


def _step_inputs(c: _Checker, decoder: nn.Module, facts: dict[str, Any], b: int, h: int, w: int, p: Tensor) -> dict:
    make = facts["stream_inputs"]
    if make is None:
        return {}
    with c.calling("stream_inputs"):
        inputs = make(b, h, w, dtype=p.dtype, device=p.device)
    if not isinstance(inputs, dict) or set(inputs) != set(facts["step_inputs"]):
        shown = sorted(inputs) if isinstance(inputs, dict) else _show(inputs)
        raise c.fail("stream_inputs", f"makes {shown}; step_inputs names {sorted(facts['step_inputs'])}")
    if "noise" in inputs and len(inputs["noise"]) != len(facts["noise_scales"]):
        raise c.fail(
            "stream_inputs", f"makes {len(inputs['noise'])} noise maps, noise_scales has {len(facts['noise_scales'])}"
        )
    return inputs


@contextmanager
def _watched(c: _Checker, facts: dict[str, Any], h: int, w: int) -> Iterator[list[str]]:
    """Within the block, every stage call is recorded and its input's spatial size checked."""
    calls: list[str] = []

    def hook(name: str, scale: Fraction) -> Callable[..., None]:
        def check(_module: nn.Module, args: tuple) -> None:
            calls.append(name)
            x = args[0] if args else None
            want = (int(h * scale), int(w * scale))
            if isinstance(x, Tensor) and x.dim() == 5 and tuple(x.shape[-2:]) != want:
                raise c.fail("stages", f"stage {name!r} runs at {tuple(x.shape[-2:])}, its scale {scale} says {want}")

        return check

    handles = [block.register_forward_pre_hook(hook(name, scale)) for name, scale, block in facts["stages"]]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _check_steps(
    c: _Checker, decoder: nn.Module, facts: dict[str, Any], z: int, size: tuple[int, int], frames: int
) -> None:
    """Run the decoder: shapes of frames and states per step, chunkings against one-shot decoding."""
    p = next(iter(decoder.parameters()), torch.zeros(()))
    b, (h, w) = 1, size
    tf, sf, offset = facts["temporal_factor"], facts["spatial_factor"], facts["output_offset"]
    clocked = facts["clocked"]
    inputs = _step_inputs(c, decoder, facts, b, h, w, p)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, z, frames, h, w, generator=g).to(p.device, p.dtype)
    specs: list[StateSpec] = facts["specs"]
    order = [name for name, _, _ in facts["stages"]]

    def run(chunks: Sequence[int]) -> Tensor:
        """The output positions of a stream over ``x``: its first frame, then ``chunks`` cyclically
        (and, on a clock, ``latency`` more frames)."""
        state = zero_state(specs, b, h, w, dtype=p.dtype, device=p.device)
        pieces, start, i = [x[:, :, :1]], 1, 0
        while start < frames:
            pieces.append(x[:, :, start : start + chunks[i % len(chunks)]])
            start, i = start + pieces[-1].shape[2], i + 1
        if clocked:
            pieces += [torch.zeros_like(x[:, :, :1])] * facts["latency"]
        outputs, position = [], 0
        for i, piece in enumerate(pieces):
            n = piece.shape[2]
            clock = {"position": position, "end": frames if position + n >= frames else None} if clocked else {}
            with _watched(c, facts, h, w) as calls, c.calling("forward"):
                out = decoder(piece, state, i == 0, **inputs, **clock)
            if sorted(calls) != sorted(order):
                raise c.fail("forward", f"a step ran the stages {calls}; it runs every stage of stages() once: {order}")
            if calls != order:
                raise c.fail("stages", f"a step ran the stages in the order {calls}, stages() lists {order}")
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor)):
                raise c.fail("forward", f"must return (frames, state), got {type(out).__name__}")
            y, state = out
            if not isinstance(state, tuple) or len(state) != len(specs):
                count = len(state) if isinstance(state, tuple) else type(state).__name__
                raise c.fail("forward", f"returned {count} state tensors; state_specs declares {len(specs)}")
            for s, t in zip(specs, state, strict=True):
                if not isinstance(t, Tensor) or tuple(t.shape) != s.shape(b, h, w):
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise c.fail("state_specs", f"{s.name} says {s.shape(b, h, w)}, the step returned {got}")
            if y.dim() != 5 or y.shape[:2] != (b, 3):
                raise c.fail("forward", f"a step gave frames {tuple(y.shape)}, not (batch, 3, frames, height, width)")
            if tuple(y.shape[-2:]) != (sf * h, sf * w):
                raise c.fail(
                    "spatial_factor",
                    f"a step on a {h}x{w} latent grid gave {y.shape[-2]}x{y.shape[-1]} frames; spatial_factor {sf} "
                    f"promises {sf * h}x{sf * w}",
                )
            first_rule = i == 0 and not clocked
            if first_rule and y.shape[2] != 1:
                raise c.fail(
                    "output_offset" if y.shape[2] == tf else "forward",
                    f"is {offset}, but the first chunk (one latent frame) gave {y.shape[2]} frames, not 1: a decoder "
                    "whose first output positions are not frames declares output_offset and runs on a clock",
                )
            if not first_rule and y.shape[2] != tf * n:
                raise c.fail(
                    "temporal_factor",
                    f"a chunk of {n} latent frames gave {y.shape[2]} frames; temporal_factor {tf} promises {tf * n}",
                )
            outputs.append(y)
            position += n
        return torch.cat(outputs, dim=2)

    clip = 1 + tf * (frames - 1)
    runs = {chunks: run(chunks) for chunks in ((frames - 1,), (1,))}
    if clocked:
        with c.calling("forward"):
            reference, _ = decoder(x, (), False, **inputs, position=0, end=frames, full=True)
        if reference.shape[2] != clip:
            raise c.fail(
                "forward", f"full=True gave {reference.shape[2]} frames for {frames} latent frames, not {clip}"
            )
        _check_offset(c, facts, reference, runs[(1,)], clip)
        runs = {chunks: got[:, :, offset : offset + clip] for chunks, got in runs.items()}
    else:
        reference = runs[(frames - 1,)]
    scale = max(1.0, float(reference.abs().max()))
    for chunks, got in runs.items():
        if got.shape != reference.shape:
            raise c.fail("forward", f"chunks {[1, *chunks]}: {tuple(got.shape)}, one-shot {tuple(reference.shape)}")
        err = float((got - reference).abs().max())
        if not err <= TOLERANCE * scale:
            raise c.fail("forward", f"chunks {[1, *chunks]}... differ from one-shot decoding by {err:.3g}")


def _check_offset(c: _Checker, facts: dict[str, Any], reference: Tensor, positions: Tensor, clip: int) -> None:
    """A clocked decoder's clip is output positions ``output_offset`` .. ``output_offset + clip`` of its
    stream, and ``latency`` flush frames bring out the last of them."""
    offset, tf = facts["output_offset"], facts["temporal_factor"]
    scale = max(1.0, float(reference.abs().max()))
    errors = [
        float((positions[:, :, o : o + clip] - reference).abs().max()) for o in range(positions.shape[2] - clip + 1)
    ]
    best = min(range(len(errors)), key=errors.__getitem__) if errors else None
    if best is not None and errors[best] <= TOLERANCE * scale and best != offset:
        raise c.fail("output_offset", f"is {offset}, but the clip's first frame is output position {best}")
    if positions.shape[2] < offset + clip:
        raise c.fail(
            "latency", f"is {facts['latency']}: the stream ends at output position {positions.shape[2]}, before "
            f"the clip's last frame ({offset + clip - 1}); temporal_factor {tf}",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------------------------
def named_layouts(family: Any, teacher: nn.Module) -> list[str]:
    """The checkpoint layouts (``families.LAYOUTS``) ``family`` names ``teacher``'s parameters in
    (``key_names`` does not refuse them). Every family names ``flashvaed``."""
    from ..errors import CheckpointError
    from .families.base import LAYOUTS

    layouts = []
    for layout in LAYOUTS:
        try:
            family.key_names(teacher, layout)
        except (CheckpointError, KeyError, NotImplementedError):
            continue
        layouts.append(layout)
    return layouts


def written_layouts(family: Any, teacher: nn.Module) -> list[str]:
    """The layouts ``checkpoint.save_teacher`` writes ``teacher`` in: those it is named in whose
    checkpoint reads back as its configuration. A layout may name every family's teacher but carry
    only some configurations (Wan's original files hold no latent statistics: only the released
    ones, for the released latent channels, read back). Every teacher is written in ``flashvaed``."""
    from ..errors import CheckpointError

    layouts = []
    for layout in named_layouts(family, teacher):
        tensors, described = checkpoint_in(family, teacher, layout)
        try:
            back = family.infer_config(tensors, layout, described)
        except CheckpointError:
            continue
        if same_config(back, teacher.config):
            layouts.append(layout)
    return layouts


def same_config(a: Any, b: Any) -> bool:
    """Two configurations equal as a checkpoint stores them (floats as float32)."""
    from .checkpoint import as_stored

    return type(a) is type(b) and as_stored(a.to_dict()) == as_stored(b.to_dict())


def checkpoint_in(family: Any, teacher: nn.Module, layout: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the configuration a reader sees of ``teacher`` written in ``layout`` (what
    ``checkpoint.save_teacher`` writes: a diffusers directory's config.json, a single file's metadata)."""
    names = family.key_names(teacher, layout)
    tensors = {names[k]: v for k, v in teacher.state_dict().items()}
    tensors.update(family.config_tensors(teacher.config, layout))
    if layout == "diffusers":
        described: dict[str, Any] = dict(family.diffusers_config(teacher.config))
    elif layout == "flashvaed":
        described = {"flashvaed.family": family.name, "flashvaed.config": json.dumps(teacher.config.to_dict())}
    else:
        described = dict(family.file_metadata(teacher.config, layout) or {})
    return tensors, described


def check_family(family: Any, *, decoder: bool = True) -> None:
    """Check a family against the contract (``Family``): its attributes, its tiny teacher built and
    run, its configuration round-tripped, a checkpoint of it in every layout it writes detected and
    read back to the same configuration and names, its decoder (``check_decoder``, teacher and
    student kinds) and encoder run. Raises ``ContractError`` naming the first member at fault."""
    from .blocks import OPS
    from .families import base
    from .student import STUDENT_VERSION
    from .vae import TeacherVAE

    raw = getattr(family, "name", None)
    c = _Checker(f"family {raw!r}" if isinstance(raw, str) else f"family {type(family).__name__}")
    for name in FAMILY_ATTRIBUTES:
        c.member(family, name)
    for name in FAMILY_METHODS:
        c.method(family, name)
    if not isinstance(family.name, str) or not NAME.fullmatch(family.name):
        raise c.fail("name", f"must be a short lower-case name like 'wan2.1', got {_show(family.name)}")
    if family.name in base.FAMILIES and base.FAMILIES[family.name] is not family:
        raise c.fail("name", f"{family.name!r} is registered to another family")
    for name in ("title", "diffusers_vae", "pipelines"):
        value = getattr(family, name)
        if not isinstance(value, str) or not value.strip():
            raise c.fail(name, f"must be a non-empty string, got {_show(value)}")
    if not family.diffusers_vae.isidentifier():
        raise c.fail("diffusers_vae", f"must name a diffusers class, got {family.diffusers_vae!r}")
    config_type = family.config_type
    if not isinstance(config_type, type) or not all(
        callable(getattr(config_type, m, None)) for m in ("to_dict", "from_dict")
    ):
        raise c.fail("config_type", f"must be a class with to_dict and from_dict, got {_show(config_type)}")
    if not isinstance(family.teacher_type, type) or not issubclass(family.teacher_type, TeacherVAE):
        raise c.fail("teacher_type", f"must be a TeacherVAE subclass, got {_show(family.teacher_type)}")
    if getattr(family.teacher_type, "family_def", None) is not family:
        raise c.fail("teacher_type", f"{family.teacher_type.__name__}.family_def must be this family")
    ops = family.ops
    if not isinstance(ops, tuple) or not ops or any(op not in OPS for op in ops):
        raise c.fail("ops", f"must be a tuple of registered operator kinds ({', '.join(OPS)}), got {_show(ops)}")

    with c.calling("tiny_config"):
        config = family.tiny_config()
    if type(config) is not config_type:
        raise c.fail("tiny_config", f"returned {type(config).__name__}, not a {config_type.__name__}")
    with c.calling("config_type"):
        d = config.to_dict()
        back = config_type.from_dict(json.loads(json.dumps(d)))
    if back != config:
        raise c.fail("config_type", "from_dict(to_dict()) through JSON is another configuration")
    with c.calling("config_from_dict"):
        again = family.config_from_dict(json.loads(json.dumps(d)))
    if again != config:
        raise c.fail("config_from_dict", f"read {type(again).__name__} back, not the configuration written")
    with c.calling("describe"):
        text = family.describe(config)
    if not isinstance(text, str) or not text:
        raise c.fail("describe", f"must return a non-empty string, got {_show(text)}")
    with c.calling("scaling_factor"):
        sf_latent = family.scaling_factor(config)
    if isinstance(sf_latent, bool) or not isinstance(sf_latent, numbers.Real) or not 0 < sf_latent < math.inf:
        raise c.fail("scaling_factor", f"must be a finite number > 0, got {_show(sf_latent)}")

    with c.calling("teacher_layout"):
        layout = family.teacher_layout(config)
    if not isinstance(layout, DecoderLayout) or layout.family != family.name:
        shown = layout.family if isinstance(layout, DecoderLayout) else type(layout).__name__
        raise c.fail("teacher_layout", f"must be a DecoderLayout of family {family.name!r}, got {shown!r}")
    if layout.z_dim != len(config.latents_mean):
        raise c.fail("teacher_layout", f"z_dim {layout.z_dim}, but the config has {len(config.latents_mean)} channels")
    with c.calling("upgrade_student_layout"):
        upgraded = family.upgrade_student_layout(layout.to_dict(), STUDENT_VERSION)
    if not isinstance(upgraded, dict) or DecoderLayout.from_dict(upgraded) != layout:
        raise c.fail("upgrade_student_layout", "must return a current layout unchanged")
    for name in ("build_post_quant_conv", "build_quant_conv", "build_encoder"):
        with c.calling(name):
            module = getattr(family, name)(config)
        if not isinstance(module, nn.Module):
            raise c.fail(name, f"returned {type(module).__name__}, not a torch module")
    for student in (False, True):
        with c.calling("build_decoder"):
            built = family.build_decoder(config, layout, student=student)
        if not isinstance(built, nn.Module):
            raise c.fail("build_decoder", f"returned {type(built).__name__}, not a torch module")
        if decoder:
            check_decoder(built, latent_channels=layout.z_dim, owner=c.owner)

    with c.calling("teacher_type"):
        torch.manual_seed(0)
        teacher = family.teacher_type(config).eval()
    if teacher.family != family.name or teacher.config != config:
        raise c.fail("teacher_type", "must build a teacher of this family from the configuration it is given")
    tf, sf = teacher.temporal_factor, teacher.spatial_factor
    _check_decoder_ops(c, family, teacher, layout)
    res = family.default_resolution
    if not (isinstance(res, tuple) and len(res) == 2 and all(_is_int(v, 1) and v % sf == 0 for v in res)):
        raise c.fail("default_resolution", f"must be (height, width) in multiples of {sf} pixels, got {_show(res)}")
    clip = family.clip_frames
    if not _is_int(clip, 1) or (clip - 1) % tf:
        raise c.fail("clip_frames", f"must be 1 + n * {tf} (temporal_factor), got {_show(clip)}")
    _check_encoder(c, teacher, tf, sf)
    if not _is_int(family.order, 0):
        raise c.fail("order", f"must be an integer >= 0 (the registry's sort key), got {_show(family.order)}")
    reads = family.pipeline_reads
    if not isinstance(reads, tuple) or not all(isinstance(r, str) and r.removeprefix("config.") for r in reads):
        raise c.fail("pipeline_reads", f"must be a tuple of 'config.NAME' fields or attributes, got {_show(reads)}")
    with c.calling("pipeline_fields"):
        fields = family.pipeline_fields(config, teacher)
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise c.fail("pipeline_fields", f"must return a dict of config fields, got {_show(fields)}")
    listed = {r.removeprefix("config.") for r in reads if r.startswith("config.")}
    if set(fields) != listed:
        raise c.fail(
            "pipeline_fields", f"gives {sorted(fields)}; pipeline_reads lists the config fields {sorted(listed)}"
        )
    with c.calling("diffusers_config"):
        described = family.diffusers_config(config)
        json.dumps(described)
    if not isinstance(described, dict) or described.get("_class_name", family.diffusers_vae) != family.diffusers_vae:
        raise c.fail(
            "diffusers_config", f"must be a config.json dict of {family.diffusers_vae}, got {_show(described)}"
        )
    _check_checkpoints(c, family, teacher)
    _check_embedded(c, family)


def _check_decoder_ops(c: _Checker, family: Any, teacher: nn.Module, layout: DecoderLayout) -> None:
    ops = set(teacher.decoder.stage_ops().values()) if callable(getattr(teacher.decoder, "stage_ops", None)) else set()
    missing = sorted(ops - set(family.ops))
    if missing:
        raise c.fail("ops", f"lacks {', '.join(missing)}, which its teacher decoder builds")


def _check_encoder(c: _Checker, teacher: nn.Module, tf: int, sf: int) -> None:
    if not callable(getattr(teacher.encoder, "iter_encode", None)):
        raise c.fail("build_encoder", "the encoder has no iter_encode(video)")
    video = torch.rand(1, 3, 1 + 2 * tf, 2 * sf, 2 * sf, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad(), c.calling("build_encoder"):
        z = teacher.encode(video)
    want = (1, teacher.latent_channels, 3, 2, 2)
    if tuple(z.shape) != want or not torch.isfinite(z).all():
        raise c.fail("build_encoder", f"a video of {1 + 2 * tf} frames encodes to {tuple(z.shape)}, not {want}")
    with torch.no_grad(), c.calling("build_post_quant_conv"):
        y = teacher.post_quant_conv(z)
    if y.shape != z.shape:
        raise c.fail("build_post_quant_conv", f"maps latents {tuple(z.shape)} to {tuple(y.shape)}")


def _check_checkpoints(c: _Checker, family: Any, teacher: nn.Module) -> None:
    """Every layout the family writes: names one to one, detected as itself, read back the same."""
    from ..errors import CheckpointError
    from .checkpoint import match_keys
    from .families.base import FAMILIES, Match
    from .families.base import detect as registry_detect

    ours = set(teacher.state_dict())
    layouts = named_layouts(family, teacher)
    if "flashvaed" not in layouts:
        raise c.fail("key_names", "must map a teacher into the flashvaed layout")
    for layout in layouts:
        with c.calling("key_names"):
            names = family.key_names(teacher, layout)
        if not isinstance(names, dict) or set(names) != ours:
            missing = sorted(ours - set(names)) if isinstance(names, dict) else []
            raise c.fail("key_names", f"{layout}: must name every entry of the state dict (missing {missing[:3]})")
        if len(set(names.values())) != len(names) or not all(isinstance(v, str) for v in names.values()):
            raise c.fail("key_names", f"{layout}: names must be distinct strings")
        with c.calling("config_tensors"):
            extra = family.config_tensors(teacher.config, layout)
        if not isinstance(extra, dict) or not all(isinstance(v, Tensor) for v in extra.values()):
            raise c.fail("config_tensors", f"{layout}: must return a dict of tensors, got {_show(extra)}")
        if set(extra) & set(names.values()):
            raise c.fail(
                "config_tensors", f"{layout}: writes {sorted(set(extra) & set(names.values()))[:2]} over weights"
            )
        with c.calling("file_metadata"):
            metadata = family.file_metadata(teacher.config, layout)
        if metadata is not None and (
            not isinstance(metadata, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise c.fail("file_metadata", f"{layout}: must be None or a dict of strings, got {_show(metadata)}")
        tensors, described = checkpoint_in(family, teacher, layout)
        keys = set(tensors)
        with c.calling("layouts_present"):
            present = family.layouts_present(keys)
        if not isinstance(present, dict) or len(present) > 1 or (present and layout not in present):
            raise c.fail("layouts_present", f"a checkpoint in the {layout} layout shows {_show(present)}")
        with c.calling("detect"):
            matches = family.detect(keys, tensors, described)
        if not isinstance(matches, list) or not all(isinstance(m, Match) for m in matches):
            raise c.fail("detect", f"must return a list of Match, got {_show(matches)}")
        found = [(m.family is family, m.layout, m.student) for m in matches]
        if found != [(True, layout, False)]:
            raise c.fail("detect", f"a teacher in the {layout} layout is detected as {found or 'nothing'}")
        if family.name in FAMILIES:
            with c.calling("detect"):
                match = registry_detect(tensors, described, f"a {layout} checkpoint")
            if match.family is not family:
                raise c.fail("detect", f"the registry reads a {layout} checkpoint as {match.family.name}")
        with c.calling("config_tensor_keys"):
            skip = family.config_tensor_keys(layout, keys)
        if not isinstance(skip, (set, frozenset)) or not skip <= keys:
            raise c.fail(
                "config_tensor_keys", f"{layout}: must be a subset of the checkpoint's keys, got {_show(skip)}"
            )
        if skip != set(extra):
            raise c.fail(
                "config_tensor_keys", f"{layout}: names {sorted(skip)[:3]}, config_tensors wrote {sorted(extra)[:3]}"
            )
        if layout == "flashvaed":  # our own layout carries every configuration; others may carry only some
            with c.calling("infer_config"):
                back = family.infer_config(tensors, layout, described)
            if not same_config(back, teacher.config):
                raise c.fail("infer_config", f"reads a {layout} checkpoint as another configuration")
        else:
            try:
                back = family.infer_config(tensors, layout, described)
            except CheckpointError:  # the layout cannot say this configuration: save_teacher refuses it
                back = teacher.config
            if not isinstance(back, type(teacher.config)):
                raise c.fail("infer_config", f"reads a {layout} checkpoint as {type(back).__name__}")
        weights = {k: v for k, v in tensors.items() if k not in skip}
        _, report = match_keys(teacher, weights, layout)
        if not report.ok:
            raise c.fail("key_names", f"{layout}: the checkpoint does not load back: {report.summary()}")


def _check_embedded(c: _Checker, family: Any) -> None:
    name = family.embedded_teacher
    if name is None:
        return
    if not isinstance(name, str):
        raise c.fail("embedded_teacher", f"must be a file name in flashvaed/data or None, got {_show(name)}")
    path = resources.files("flashvaed").joinpath("data", name)
    if not path.is_file():
        raise c.fail("embedded_teacher", f"{name} is not in flashvaed/data")
    from .checkpoint import load_vae

    with c.calling("embedded_teacher"):
        model = load_vae(str(path))
    if model.family != family.name:
        raise c.fail("embedded_teacher", f"{name} holds a {model.family} teacher")
