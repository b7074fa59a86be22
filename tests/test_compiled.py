"""Compiled runtimes (``engines.load(..., compile=...)``) and tuned ONNX Runtime sessions.

A compiled stream must decode what the eager one decodes (fp32, 1e-5) for every family, keep
saving and loading its state, and work under tiling; modes a device cannot run are refused in
one line. Inductor's C++ compile of even a tiny model takes one to three minutes on these 2-core
machines, so by default the compiled streams here trace with dynamo and AOT autograd
(``aot_eager``: the graph inductor would compile, run by torch); ``FLASHVAED_TEST_INDUCTOR=1``
runs real inductor for every case (docs/runtimes.md).
"""

from __future__ import annotations

import copy
import itertools
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from flashvaed import engines
from flashvaed.engines import compiled, ort_backend
from flashvaed.engines.tiled import tiled
from flashvaed.errors import InputError
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import StudentSpec, families
from flashvaed.models.student import build_student

REAL_INDUCTOR = os.environ.get("FLASHVAED_TEST_INDUCTOR") == "1"
# latent frames per clip: a clocked decoder (LTX) reaches its steady steps past its warm-up only
FRAMES = {"wan2.1": 6, "wan2.2": 6, "ltx": 14, "mochi": 6}  # >= 2 steady steps each
SIZE = {"wan2.1": 4, "wan2.2": 4, "ltx": 2, "mochi": 4}


@pytest.fixture(scope="module", autouse=True)
def backend():
    old = compiled.BACKEND
    compiled.BACKEND = "inductor" if REAL_INDUCTOR else "aot_eager"
    yield compiled.BACKEND
    compiled.BACKEND = old


def teacher(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    fam = families.get(name)
    return fam.teacher_type(fam.tiny_config()).eval()


def latents_for(model: torch.nn.Module, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    s = SIZE[name]
    return torch.randn(1, model.latent_channels, FRAMES[name], s, s, generator=g)


@pytest.fixture(scope="module")
def wan() -> torch.nn.Module:
    return teacher("wan2.1")


@pytest.mark.parametrize("name", ["wan2.1", "wan2.2", "ltx", "mochi", "flash-wan2.1"])
def test_compiled_stream_equals_eager(name, wan):
    """Teachers of every family and the flash-wan2.1 student: the compiled steady steps run
    (their compile is timed once per shape) and the clip equals the eager decode."""
    if name.startswith("flash-"):
        family = name.removeprefix("flash-")
        torch.manual_seed(0)
        model = build_student(StudentSpec.load(name), families.get(family).tiny_config())[0].eval()
    else:
        family, model = name, wan if name == "wan2.1" else teacher(name)  # wan: its compile serves later tests
    z = latents_for(model, family)
    eager = engines.load(model).decode(z, chunk=2)
    decoder = engines.load(model, compile="inductor")
    graphs = []  # dynamo's graph count after each chunk: it grows at one step (the compile), no other
    pieces = []
    for piece in decoder.iter_decode(z, chunk=2):
        pieces.append(piece)
        graphs.append(counters["stats"]["unique_graphs"])
    frames = torch.cat(pieces, dim=2)
    assert sum(b > a for a, b in itertools.pairwise(graphs)) <= 1, graphs  # no recompile for a new state layout
    assert decoder.steady is not None and len(decoder.steady.compile_seconds) == 1  # one shape, compiled once
    torch.testing.assert_close(frames, eager, rtol=0, atol=1e-5)
    again = decoder.decode(z, chunk=2)  # a second clip of the shape: no new compile
    assert len(decoder.steady.compile_seconds) == 1
    torch.testing.assert_close(again, frames, rtol=0, atol=0)


def test_ltx_compiles_past_its_warm_up_with_a_tensor_clock():
    """A clocked decoder's steps before its warm-up ends, and once its end is known, stay eager;
    the steady ones take a 0-d tensor clock, so one compiled step serves every position."""
    model = teacher("ltx")
    decoder = engines.load(model, compile="inductor")
    steady = decoder.steady
    assert steady.clocked and steady.warmup == -(-model.output_offset // model.temporal_factor)
    assert not steady.takes(steady.warmup - 1, None) and not steady.takes(steady.warmup + 5, steady.warmup + 9)
    assert steady.takes(steady.warmup + 5, None)


def test_save_and_load_state_under_compile(wan):
    z = latents_for(wan, "wan2.1")[:, :, :5]  # first, 2, then a tail of 2: the stream's chunk, compiled
    decoder = engines.load(wan, compile="inductor")
    stream = decoder.stream()
    head = stream.push(z[:, :, :3])
    saved = stream.save_state()
    tail = stream.push(z[:, :, 3:], final=True)
    resumed = decoder.stream()
    resumed.load_state(saved)
    torch.testing.assert_close(resumed.push(z[:, :, 3:], final=True), tail, rtol=0, atol=0)
    eager = engines.load(wan)
    plain = eager.stream()  # a state saved by an eager stream resumes in a compiled one
    plain.push(z[:, :, :3])
    other = decoder.stream()
    other.load_state(plain.save_state())
    torch.testing.assert_close(other.push(z[:, :, 3:], final=True), tail, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), eager.decode(z, chunk=2), rtol=0, atol=1e-5)


def test_odd_chunks_stay_eager(wan):
    """A short last chunk is not the stream's chunk length: it runs eager, nothing compiles for it."""
    z = latents_for(wan, "wan2.1")[:, :, :4]  # first, then 2, then a last chunk of 1
    decoder = engines.load(wan, compile="inductor")
    frames = decoder.decode(z, chunk=2)
    assert len(decoder.steady.compile_seconds) == 1
    torch.testing.assert_close(frames, engines.load(wan).decode(z, chunk=2), rtol=0, atol=1e-5)


def test_compiled_decoder_under_tiling(wan):
    """Tiles of a decoder with frame-wide modules run its eager step with their hooks; tiled
    decoding of a compiled decoder equals the untiled eager decode."""
    z = torch.randn(1, wan.latent_channels, 3, 4, 26, generator=torch.Generator().manual_seed(2))
    decoder = tiled(engines.load(wan, compile="inductor"), (4, 24))  # two tiles (halo 11)
    assert decoder.describe()["compile"] == "inductor"
    torch.testing.assert_close(decoder.decode(z, chunk=2), engines.load(wan).decode(z, chunk=2), rtol=0, atol=1e-5)


def test_describe_and_auto(wan):
    assert engines.load(wan).describe()["compile"] == "none"
    assert engines.load(wan, compile="none").describe()["compile"] == "none"
    assert engines.load(wan, compile="auto").describe()["compile"] == "none"  # CPU: eager (docs/runtimes.md)
    assert compiled.resolve_compile("auto", "cuda") == "cudagraphs"
    assert engines.load(wan, compile="inductor").describe()["compile"] == "inductor"


@pytest.mark.parametrize(
    ("mode", "says"),
    [("cudagraphs", "runs on CUDA devices only"), ("max", "runs on CUDA devices only"), ("fast", "unknown compile")],
)
def test_refusals(wan, mode, says):
    with pytest.raises(InputError, match=says) as e:
        engines.load(wan, compile=mode)
    assert "\n" not in str(e.value)
    assert e.value.render(lambda p: "--" + p).count("--compile") == 1


# ONNX Runtime --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_dir(wan, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "e"
    export(wan, out, ExportOptions(chunk="2", height="32", width="32", batch="1"))
    return out


def test_compile_refused_for_engines(export_dir):
    with pytest.raises(InputError, match="applies to torch models; this is a ONNX Runtime engine"):
        engines.load(export_dir, compile="inductor")
    assert engines.load(export_dir, compile="none").backend == "onnxruntime"


def test_tuned_session_options():
    options = ort_backend.session_options()
    assert options.intra_op_num_threads == ort_backend.physical_cores() >= 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert ort_backend.session_options({"intra_op_num_threads": 1}).intra_op_num_threads == 1  # a manifest's word
    assert ort_backend.session_options({"intra_op_num_threads": 0}).intra_op_num_threads == ort_backend.physical_cores()


def plain_decode(decoder: ort_backend.OnnxRuntimeDecoder, z: torch.Tensor) -> torch.Tensor:
    """The same clip through ``session.run`` with numpy feeds: no binding, no state buffers."""
    contract = decoder.contract
    x = z.numpy()
    out, state = decoder.sessions["first"].run(None, {"latents": x[:, :, :1]}), None
    frames, state = [out[0]], out[1:]
    for start in range(1, x.shape[2], 2):
        feeds = {"latents": x[:, :, start : start + 2]}
        feeds.update({t.input: s for t, s in zip(contract.state, state, strict=True)})
        out = decoder.sessions["steady"].run(None, feeds)
        frames.append(out[0])
        state = out[1:]
    return torch.from_numpy(np.concatenate(frames, axis=2))


def test_io_binding_with_warm_up_equals_plain_runs(export_dir):
    """The I/O-binding path (state in torch buffers bound through DLPack, swapped step to step),
    with the warm-up a CUDA session gets forced on, equals plain session runs; saved states too."""
    z = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    decoder = engines.load(export_dir)
    decoder.warm_up = True
    stream = decoder.stream()
    head = stream.push(z[:, :, :3])
    assert isinstance(stream.state, ort_backend.TensorState) and decoder.warmed == {("", 1, 4, 4)}
    saved = stream.save_state()
    tail = stream.push(z[:, :, 3:])
    torch.testing.assert_close(torch.cat([head, tail], dim=2), plain_decode(decoder, z), rtol=0, atol=0)
    resumed = decoder.stream()
    resumed.load_state(saved)
    torch.testing.assert_close(resumed.push(z[:, :, 3:]), tail, rtol=0, atol=0)


def test_api_and_cli_take_compile(wan, tmp_path):
    """``api.decode(compile=...)`` and ``decode --compile``: a checkpoint decodes compiled, and a
    mode the device cannot run is refused by its flag's name (exit 2) before the model is read."""
    from typer.testing import CliRunner

    from flashvaed import api
    from flashvaed.cli import app
    from flashvaed.models import save_teacher

    z = latents_for(wan, "wan2.1")[:, :, :3]
    torch.save(z, tmp_path / "z.pt")
    save_teacher(wan, tmp_path / "t.safetensors")
    r = api.decode(tmp_path / "z.pt", tmp_path / "t.safetensors", tmp_path / "o.pt", device="cpu", compile="inductor")
    frames = torch.load(r.output, weights_only=True)["frames"]
    torch.testing.assert_close(frames, engines.load(wan).decode(z, chunk=2), rtol=0, atol=1e-5)
    argv = ["decode", str(tmp_path / "z.pt"), "-m", str(tmp_path / "t.safetensors"), "-o", str(tmp_path / "p.pt")]
    r = CliRunner().invoke(app, [*argv, "--device", "cpu", "--compile", "max"])
    assert r.exit_code == 2 and "--compile max runs on CUDA devices only" in r.output, r.output
    assert not (tmp_path / "p.pt").exists()


class HostTensors(TorchDispatchMode):
    """Records every op that leaves a tensor on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = out if isinstance(out, tuple | list) else (out,)
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("name", ["ltx", "flash-ltx"])
def test_a_tensor_clock_step_makes_nothing_on_the_host(name):
    """The steady step compiled and CUDA-graph streams run (a 0-d tensor clock, the whole step)
    creates no tensor on the host: a CUDA graph cannot capture a copy from pageable host memory
    (on an H200 the LTX step once fell back to uncaptured for that). Run on the meta device, where
    any host tensor stands out."""
    if name == "ltx":
        model = teacher("ltx")
    else:
        torch.manual_seed(0)
        model = build_student(StudentSpec.load(name), families.get("ltx").tiny_config())[0].eval()
    z = latents_for(model, "ltx")
    decoder = engines.load(model, compile="inductor")
    steady = decoder.steady
    stream = decoder.stream()
    stream.push(z[:, :, : 1 + 2 * steady.warmup])  # eager, past the warm-up
    meta = torch.device("meta")
    on_meta = copy.deepcopy(model).to(meta)
    state = tuple(t.to(meta) for t in stream.state)
    inputs = tree_map(lambda v: v.to(meta) if isinstance(v, torch.Tensor) else v, stream.inputs)
    clock = {"position": torch.tensor(stream.position, device=meta), **steady.extra}
    latents = z[:, :, :2].to(meta)
    record = HostTensors()
    with torch.no_grad(), record:
        frames, _ = compiled._steady(on_meta, latents, state, stream.clamp, inputs, clock)
    assert frames.device == meta and frames.shape[2] > 0
    assert record.ops == []


@pytest.mark.parametrize(  # a compiled LTX stream runs every kind of step: eager warm-up, compiled, flush
    ("name", "compile_mode"), [("wan2.1", "none"), ("ltx", "none"), ("ltx", "inductor")]
)
def test_frames_on_the_device_never_touch_the_host(name, compile_mode, wan):
    """``frames_on="device"``: every piece a stream hands back (steps, a clocked decoder's
    warm-up and flush) stays on the model's device. On the meta device any host copy fails (and
    the default, frames on the CPU, does fail there), so passing here means no copy was made."""
    model = wan if name == "wan2.1" else teacher(name)
    z = latents_for(model, name)
    on_meta = copy.deepcopy(model).to("meta")
    decoder = engines.load(on_meta, device="meta", compile=compile_mode, frames_on="device")
    decoder.check_memory = lambda *a, **k: None  # meta tensors have no memory to measure, no values to hash
    decoder._fingerprint = "meta"
    assert decoder.describe()["frames_on"] == "device"
    pieces = list(decoder.iter_decode(z, chunk=2))  # host latents: each step moves its chunk
    assert pieces and all(p.device.type == "meta" and p.dtype == torch.float32 for p in pieces)
    assert sum(p.shape[2] for p in pieces) == 1 + model.temporal_factor * (z.shape[2] - 1)
    host = engines.load(on_meta, device="meta")
    host.check_memory, host._fingerprint = (lambda *a, **k: None), "meta"
    with pytest.raises(NotImplementedError):  # the contract's default copies to the host: impossible from meta
        list(host.iter_decode(z, chunk=2))


def test_frames_on_is_checked_and_refused_for_engines(wan, export_dir):
    with pytest.raises(InputError, match="frames_on.*cpu or device") as e:
        engines.load(wan, frames_on="gpu")
    assert e.value.render(lambda p: "--" + p.replace("_", "-")).startswith("--frames-on must be")
    with pytest.raises(InputError, match="frames_on.* device applies to torch models; ONNX Runtime engines"):
        engines.load(export_dir, frames_on="device")
    frames = engines.load(wan, frames_on="device").decode(latents_for(wan, "wan2.1"), chunk=2)
    torch.testing.assert_close(frames, engines.load(wan).decode(latents_for(wan, "wan2.1"), chunk=2), rtol=0, atol=0)


class HostCopies(TorchDispatchMode):
    """Records the dtype of every tensor copied to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and str(kwargs.get("device")) == "cpu":
            self.dtypes.append(args[0].dtype)
        return func(*args, **kwargs)


def test_decode_to_video_copies_uint8_frames_to_the_host(wan, monkeypatch, tmp_path):
    """``decode`` to a video or PNGs asks a torch model for frames on its device and makes them uint8
    there: only uint8 crosses to the host (shown on the meta device, where the copy itself fails);
    engines, tiles and raw tensor outputs keep host frames, and the frames written are the same."""
    from flashvaed import api, io
    from flashvaed.models import save_teacher

    z = latents_for(wan, "wan2.1")[:, :, :3]
    torch.save(z, tmp_path / "z.pt")
    save_teacher(wan, tmp_path / "t.safetensors")
    asked = []
    load = engines.load
    monkeypatch.setattr(engines, "load", lambda *a, **k: asked.append(k["frames_on"]) or load(*a, **k))
    api.decode(tmp_path / "z.pt", tmp_path / "t.safetensors", tmp_path / "png", device="cpu")
    api.decode(tmp_path / "z.pt", tmp_path / "t.safetensors", tmp_path / "tiled", device="cpu", tile="4x4")
    api.decode(tmp_path / "z.pt", tmp_path / "t.safetensors", tmp_path / "o.pt", device="cpu")
    assert asked == ["device", "cpu", "device"]
    for a, b in zip(sorted((tmp_path / "png").glob("*.png")), sorted((tmp_path / "tiled").glob("*.png")), strict=True):
        assert a.read_bytes() == b.read_bytes()
    record = HostCopies()
    with record, pytest.raises(NotImplementedError):  # meta: no data to copy, but the copy is asked for
        io.to_uint8(torch.zeros(3, 2, 4, 4, device="meta"))
    assert record.dtypes == [torch.uint8]
