"""Exact spatial tiling: tiled decoding equals untiled decoding for every family, teacher and student.

The oracle is the same model decoding the whole frame at once. Grids have at least 2x2 tiles whose
sizes do not divide the frame; whole clips go tile by tile, streams chunk by chunk with uneven pushes.
Teachers run in float64, where tiled and untiled frames (returned as float32) are at most one
float32 rounding apart (tiling is exact in arithmetic: in float64 they differ by 1e-13); students,
and the embedded teacher through ``api.decode``, in float32, within 2e-5 and 1e-5 (random-weight
tiny models amplify float32 rounding: their chunkings alone differ by 2e-6).
The halo is checked against an independent measure: the support of the gradient of one output pixel
(float64) for a decoder without frame-wide modules.
"""

from __future__ import annotations

import pytest
import torch

from flashvaed import api
from flashvaed.demo import embedded_teacher_path
from flashvaed.engines.tiled import TiledDecoder, choose_tile, parse_memory, parse_tile, tiled
from flashvaed.engines.torch_backend import TorchDecoder
from flashvaed.errors import InputError
from flashvaed.models import StudentSpec, families, load_model
from flashvaed.models.student import build_student
from flashvaed.models.tiling import plan_tiling, split_axis, tile_grid

FAMILIES = families.names()
PRESET = {"wan2.1": "flash-wan2.1", "wan2.2": "flash-wan2.2", "ltx": "flash-ltx", "mochi": "flash-mochi"}
ATOL = 1e-5  # float32, trained weights (the embedded teacher)
ATOL32 = 2e-5  # float32, random weights
ATOL64 = 2.5e-7  # float64 computation; frames come back as float32: one rounding apart at most


def teacher(name: str):
    torch.manual_seed(0)
    fam = families.get(name)
    return fam.teacher_type(fam.tiny_config()).eval()


def student(name: str, preset: str | None = None):
    torch.manual_seed(1)
    spec = LOWRANK if preset == LOWRANK.name else StudentSpec.load(preset or PRESET[name])
    return build_student(spec, families.get(name).tiny_config())[0].eval()


def lowrank_spec() -> StudentSpec:
    """flash-wan2.2-fast with its up1 upsample conv low-rank (``resample: lowrank``) instead."""
    spec = StudentSpec.load("flash-wan2.2-fast").to_dict()
    spec["name"] = "flash-wan2.2-lowrank"
    spec["stages"]["up1"] = {**spec["stages"]["up1"], "resample": "lowrank"}
    return StudentSpec.from_dict(spec)


LOWRANK = lowrank_spec()


def frame_for(halo: tuple[int, int], grid: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """A latent frame and a tile region splitting it in two bands (``grid``: 2x2 tiles); a frame
    narrow where it is not split keeps the tests fast."""
    size = (2 * halo[0] + 3, 2 * halo[1] + 4)
    if grid:
        return (size[0] + 3, size[1] + 3), size
    return (size[0] + 3, 6), (size[0], 6)


def stream_uneven(decoder, latents: torch.Tensor, **options) -> torch.Tensor:
    stream = decoder.stream(**options)
    pieces = [stream.push(latents[:, :, :2]), stream.push(latents[:, :, 2:], final=True)]
    if decoder.latency:
        pieces.append(stream.close())
    return torch.cat(pieces, dim=2)


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 7, 23, 24, 25, 40, 97])
@pytest.mark.parametrize("size,halo", [(24, 11), (15, 7), (13, 6), (3, 1), (40, 0)])
def test_split_axis_cores_partition_and_keep_their_halo(length, size, halo):
    spans = split_axis(length, size, halo)
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (c0, c1, r0, r1), nxt in zip(spans, [*spans[1:], None], strict=True):
        assert c0 < c1 and r0 <= c0 and c1 <= r1
        assert r1 - r0 == min(size, length)  # every region the same size: a static engine serves them all
        assert r0 == 0 or c0 - r0 >= halo
        assert r1 == length or r1 - c1 >= halo
        if nxt is not None:
            assert nxt[0] == c1


def test_split_axis_refuses_a_tile_too_small_for_its_halo():
    with pytest.raises(InputError, match="at least 23"):
        split_axis(40, 22, 11)
    assert split_axis(22, 22, 11) == [(0, 22, 0, 22)]  # the whole axis needs no halo


def test_parse_tile_and_memory():
    assert parse_tile("24x31") == (24, 31) and parse_tile("32") == (32, 32) and parse_tile(None) is None
    for bad in ("24x", "x", "0x4", "a", "1x2x3"):
        with pytest.raises(InputError, match="tile"):
            parse_tile(bad)
    assert parse_memory("8GB") == 8 * 10**9 and parse_memory("1.5GiB") == int(1.5 * 2**30) and parse_memory(7) == 7
    for bad in ("8 parsecs", "-1GB", "0", "GB"):
        with pytest.raises(InputError, match="max_memory"):
            parse_memory(bad)


# --------------------------------------------------------------------------------------------
# the halo
# --------------------------------------------------------------------------------------------
def test_halo_covers_the_measured_receptive_field():
    """The halo derived from the convs against the gradient's support: one output pixel of a decoder
    without frame-wide modules (the LTX teacher) in float64 depends on latents at most ``halo``
    latent pixels away, and on some exactly ``halo`` (or ``halo - 1``, the rounding up) away."""
    model = teacher("ltx").double()
    halo = plan_tiling(model).halo
    assert not plan_tiling(model).mixing
    h = w = 2 * max(halo) + 5
    latents = torch.randn(1, model.latent_channels, 2, h, w, dtype=torch.float64, requires_grad=True)
    frames = model.decode_clip(latents, clamp=False, timestep=0.05)
    s = model.spatial_factor
    cy, cx = (h // 2) * s, (w // 2) * s
    frames[:, :, -1, cy, cx].sum().backward()
    support = latents.grad.abs().sum(dim=(0, 1, 2)).nonzero()
    reach = (int((support[:, 0] - h // 2).abs().max()), int((support[:, 1] - w // 2).abs().max()))
    for measured, derived in zip(reach, halo, strict=True):
        assert measured <= derived <= measured + 1


def test_frame_wide_modules_are_found_in_run_order():
    assert [n for n, _ in plan_tiling(teacher("wan2.1")).mixing] == ["decoder.middle.blocks.1"]
    norms = [n for n, _ in plan_tiling(teacher("mochi")).mixing]
    assert norms[:2] == ["decoder.middle.blocks.0.norm1", "decoder.middle.blocks.0.norm2"]
    assert not plan_tiling(teacher("ltx")).mixing


def tiling_case(model, frames: int, seed: int, grid: bool = False):
    """The untiled decoder of ``model``, a frame and a tile region for its halo (two bands, or a 2x2
    grid), and random latents of ``frames`` latent frames in the model's dtype."""
    decoder = TorchDecoder(model)
    frame, region = frame_for(plan_tiling(model).halo, grid=grid)
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return decoder, frame, region, torch.randn(1, model.latent_channels, frames, *frame, dtype=dtype)


# --------------------------------------------------------------------------------------------
# exactness, every family
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_tiled_teacher_equals_untiled(name):
    """Tile by tile (whole clips, two chunkings) on two bands that do not divide the frame."""
    model = teacher(name)
    decoder, frame, region, latents = tiling_case(model, frames=3, seed=2)
    options = {"timestep": 0.05, "seed": 3} if model.step_inputs else {}
    t = tiled(decoder, region)
    assert t.tiling_report(*frame)["tiles"] == 2
    for chunk in (1, 2):
        assert (t.decode(latents, chunk, **options) - decoder.decode(latents, chunk, **options)).abs().max() <= ATOL32


@pytest.mark.parametrize("name", ["wan2.1", "ltx"])
def test_tiled_stream_equals_untiled(name):
    """Chunk by chunk (a stream, uneven pushes; LTX's latency flushed by ``close``) on a 2x2 grid."""
    model = teacher(name)
    decoder, frame, region, latents = tiling_case(model, frames=3, seed=2, grid=True)
    options = {"timestep": 0.05, "seed": 3} if model.step_inputs else {}
    t = tiled(decoder, region)
    assert t.tiling_report(*frame)["tiles"] == 4
    assert (stream_uneven(t, latents, **options) - decoder.decode(latents, 2, **options)).abs().max() <= ATOL32


def test_tiling_is_exact_in_float64():
    """Exact in arithmetic: in float64 (the attention's input placed into the frame) tiled frames are
    the untiled ones to one float32 rounding; and a 1-tile grid is the untiled decode itself."""
    model = teacher("wan2.1").double()
    decoder, frame, region, latents = tiling_case(model, frames=2, seed=2)
    reference = decoder.decode(latents, 1)
    assert (tiled(decoder, region).decode(latents, 1) - reference).abs().max() <= ATOL64
    single = tiled(decoder, (frame[0] + 9, frame[1]))
    assert single.tiling_report(*frame)["tiles"] == 1
    assert torch.equal(single.decode(latents, 1), reference)


# + a separable and a low-rank upsampler
STUDENTS = [(name, PRESET[name]) for name in FAMILIES] + [("wan2.2", "flash-wan2.2-fast"), ("wan2.2", LOWRANK.name)]


@pytest.mark.parametrize(("name", "preset"), STUDENTS, ids=[p for _, p in STUDENTS])
def test_tiled_student_equals_untiled(name, preset):
    model = student(name, preset)
    decoder, _, region, latents = tiling_case(model, frames=2, seed=4)
    options = {"timestep": 0.05} if "timestep" in model.step_inputs else {}
    reference = decoder.decode(latents, 2, **options)
    assert (tiled(decoder, region).decode(latents, 2, **options) - reference).abs().max() <= ATOL32


def test_tiled_stream_state_saves_and_loads():
    model = teacher("wan2.1")
    decoder = TorchDecoder(model)
    frame, region = frame_for(plan_tiling(model).halo)
    latents = torch.randn(1, model.latent_channels, 3, *frame)
    t = tiled(decoder, region)
    reference = decoder.decode(latents, 1)
    first = t.stream()
    head = first.push(latents[:, :, :2])
    saved = first.save_state()
    assert len(saved.tensors) == len(t.state_shapes(1, *frame)) == 2 * len(decoder.state_shapes(1, 1, 1))
    second = t.stream()
    second.load_state(saved)
    tail = second.push(latents[:, :, 2:], final=True)
    assert (torch.cat([head, tail], dim=2) - reference).abs().max() <= ATOL32
    other = tiled(decoder, (region[0] + 1, region[1]))  # another grid: other state shapes
    with pytest.raises(InputError):
        other.stream().load_state(saved)


# --------------------------------------------------------------------------------------------
# memory, the library call, bad input
# --------------------------------------------------------------------------------------------
def test_max_memory_picks_the_largest_tile_that_fits():
    model = teacher("wan2.1")
    decoder = TorchDecoder(model)
    shape = (1, 16, 3, 60, 64)
    assert choose_tile(decoder, shape, 2, 1 << 40) is None  # fits untiled
    from flashvaed.engines.tiled import tiled_decode_bytes

    small = tiled_decode_bytes(decoder, shape, 2, (30, 30))
    tile = choose_tile(decoder, shape, 2, small)
    assert tile is not None and 23 <= tile[0] <= 30 and tiled_decode_bytes(decoder, shape, 2, tile) <= small
    with pytest.raises(InputError, match="too little"):
        choose_tile(decoder, shape, 2, 1000)


def test_api_decode_tiled_equals_untiled(tmp_path):
    """``decode --tile`` on the embedded Wan2.1 teacher: the same frames, a 2x2 grid or more."""
    path = embedded_teacher_path("wan2.1")
    halo = plan_tiling(load_model(path)).halo
    frame, region = frame_for(halo)
    torch.manual_seed(5)
    torch.save(torch.randn(1, 16, 2, *frame), tmp_path / "z.pt")
    ref = api.decode(tmp_path / "z.pt", path, tmp_path / "a.pt")
    out = api.decode(tmp_path / "z.pt", path, tmp_path / "b.pt", tile=f"{region[0]}x{region[1]}")
    assert ref.shape == out.shape
    a, b = (torch.load(tmp_path / f, weights_only=True)["frames"] for f in ("a.pt", "b.pt"))
    assert (a - b).abs().max() <= ATOL
    with pytest.raises(InputError, match=f"at least {2 * halo[0] + 1}"):
        api.decode(tmp_path / "z.pt", path, tmp_path / "c.pt", tile=f"{2 * halo[0]}x{region[1]}")
    with pytest.raises(InputError, match="not both"):
        api.decode(tmp_path / "z.pt", path, tmp_path / "c.pt", tile="40", max_memory="1GB")
    assert not (tmp_path / "c.pt").exists()


def test_tiled_decoder_refuses_what_it_cannot_tile():
    with pytest.raises(InputError):
        TiledDecoder(object(), (8, 8))  # type: ignore[arg-type]
    decoder = TorchDecoder(teacher("ltx"))
    t = tiled(decoder, (10, 10))  # halo 7 needs 15
    with pytest.raises(InputError, match="at least 15"):
        t.decode(torch.randn(1, decoder.latent_channels, 2, 20, 20), 1)
    assert tile_grid(20, 20, (20, 20), (7, 7))[0].core == (0, 20, 0, 20)
