"""Engines decode frames larger than they were exported for, by exact tiling, equal to the torch
model's untiled decode: a decoder without frame-wide modules (LTX-Video: the step graphs alone), and
decoders with them, exported with ``tiling`` (Wan's middle attention: context "place"; Mochi's
per-frame group norms: "sum"), through flashvaed's runtime and through a reader of the manifest's
tiling rule that uses nothing of flashvaed (numpy and onnxruntime only)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flashvaed import engines
from flashvaed.engines.tiled import tiled
from flashvaed.errors import InputError
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import families
from flashvaed.models.families.base import tiny_statistics
from flashvaed.models.families.ltx.config import LTXConfig
from flashvaed.models.families.ltx.keys import config_from_diffusers
from flashvaed.models.families.mochi import MochiConfig
from flashvaed.models.tiling import plan_tiling

ATOL = 1e-4


def perturbed(model, seed: int):
    """Every weight moved off its initial value (zero-initialised gains and noise scales too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def ltx_teacher():
    """An LTX-Video 0.9.1-style teacher (latency, timestep, injected noise) with one upsampler:
    spatial factor 8, halo 8."""
    fields = config_from_diffusers(
        {
            "latent_channels": 8, "block_out_channels": [4, 8], "layers_per_block": [1, 1, 1],
            "decoder_block_out_channels": [8, 16], "decoder_layers_per_block": [1, 1, 1],
            "decoder_spatio_temporal_scaling": [True, False], "decoder_inject_noise": [True, True, False],
            "upsample_residual": [True, True], "upsample_factor": [2, 2], "timestep_conditioning": True,
            "spatio_temporal_scaling": [True, False],
        }
    )  # fmt: skip
    return perturbed(families.get("ltx").teacher_type(LTXConfig(**fields, **tiny_statistics(8))), 1)


def mochi_teacher():
    """A Mochi teacher of two stages: six per-frame group norms, spatial factor 2, halo 5."""
    config = MochiConfig(
        encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32), layers_per_block=(1, 1, 1),
        temporal_expansions=(2,), spatial_expansions=(2,), add_attention_block=(False, False, False),
    )  # fmt: skip
    return perturbed(families.get("mochi").teacher_type(config), 2)


def static(model, size: int, **options) -> ExportOptions:
    px = size * model.spatial_factor
    return ExportOptions(chunk="1", height=str(px), width=str(px), batch="1", **options)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    fam = families.get("wan2.1")
    model = perturbed(fam.teacher_type(fam.tiny_config()), 3)
    out = tmp_path_factory.mktemp("tiled-engine") / "wan"
    export(model, out, static(model, 24, tiling=True, tiling_frame="512x512"))  # halo 11: 24 holds it
    return model, out


# ---------------------------------------------------------------------------------------------
# a reader of the tiling rule that knows nothing of flashvaed
# ---------------------------------------------------------------------------------------------
def two_tiles(length: int, region: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(core_lo, core_hi, region_lo, region_hi) of two tiles along an axis: regions at both ends,
    cores meeting in the middle, each at least ``halo`` inside its region's inner edge."""
    assert region < length <= 2 * (region - halo)
    cut = length // 2
    return [(0, cut, 0, region), (cut, length, length - region, length)]


def manifest_tiled_decode(export_dir, latents: np.ndarray) -> np.ndarray:
    """Decode ``latents`` (one steady chunk per latent frame) as 2x2 tiles, following the manifest."""
    m = json.loads((export_dir / "manifest.json").read_text())
    graphs, tiling, state = m["graphs"], m["tiling"], m["state"]
    sessions = {g: ort.InferenceSession(str(export_dir / spec["file"])) for g, spec in graphs.items()}
    (hy, hx), size = m["model"]["tiling"]["halo"], m["shapes"]["height"]["max"]
    _, _, t, height, width = latents.shape
    tiles = [(r, c) for r in two_tiles(height, size, hy) for c in two_tiles(width, size, hx)]
    s = m["model"]["spatial_factor"]
    states: list[dict] = [{} for _ in tiles]
    frames = []
    for n in range(t):
        step = "first" if n == 0 else "steady"
        crops = [latents[:, :, n : n + 1, r[2] : r[3], c[2] : c[3]] for r, c in tiles]
        contexts: list[dict] = [{} for _ in tiles]

        def feed(graph: str, i: int, crops: list = crops, contexts: list = contexts) -> dict:
            given = {"latents": crops[i], **states[i], **contexts[i]}
            return {x["name"]: given[x["name"]] for x in graphs[graph]["inputs"]}

        for j, module in enumerate(tiling["modules"]):
            g = f"capture.{j}.{step}"
            partials = [sessions[g].run(None, feed(g, i))[0] for i in range(len(tiles))]
            a = int(module["scale"])  # the modules of these decoders sit at whole scales
            cores = [
                p[..., (r[0] - r[2]) * a : (r[1] - r[2]) * a, (c[0] - c[2]) * a : (c[1] - c[2]) * a]
                for p, (r, c) in zip(partials, tiles, strict=True)
            ]
            if module["context"] == "sum":
                groups = module["groups"]
                x = [core.astype(np.float64).reshape(core.shape[0], groups, -1, *core.shape[2:]) for core in cores]
                count = sum(v.shape[2] * v.shape[4] * v.shape[5] for v in x)
                total = sum(v.sum(axis=(2, 4, 5)) for v in x)
                squares = sum((v * v).sum(axis=(2, 4, 5)) for v in x)
                mean = total / count
                rstd = 1 / np.sqrt(np.maximum(squares / count - mean**2, 0) + module["eps"])
                for ctx in contexts:
                    ctx[f"context/{j}/mean"] = mean.transpose(0, 2, 1).astype(np.float32)
                    ctx[f"context/{j}/rstd"] = rstd.transpose(0, 2, 1).astype(np.float32)
            else:
                whole = np.zeros((*partials[0].shape[:3], height * a, width * a), partials[0].dtype)
                for core, (r, c) in zip(cores, tiles, strict=True):
                    whole[..., r[0] * a : r[1] * a, c[0] * a : c[1] * a] = core
                out = sessions[f"frame.{j}"].run(None, {"input": whole})[0]
                for ctx, (r, c) in zip(contexts, tiles, strict=True):
                    ctx[f"context/{j}"] = np.ascontiguousarray(out[..., r[2] * a : r[3] * a, c[2] * a : c[3] * a])
        g = f"tile.{step}"
        pieces = []
        for i in range(len(tiles)):
            outs = sessions[g].run(None, feed(g, i))
            states[i] = {x["input"]: v for x, v in zip(state, outs[1:], strict=True)}
            pieces.append(outs[0])
        frame = np.zeros((*pieces[0].shape[:3], height * s, width * s), np.float32)
        for piece, (r, c) in zip(pieces, tiles, strict=True):
            cy, cx = (r[0] - r[2]) * s, (c[0] - c[2]) * s
            hy_, wx = (r[1] - r[0]) * s, (c[1] - c[0]) * s
            frame[..., r[0] * s : r[1] * s, c[0] * s : c[1] * s] = piece[..., cy : cy + hy_, cx : cx + wx]
        frames.append(frame)
    return np.concatenate(frames, axis=2)


# ---------------------------------------------------------------------------------------------
def test_engine_without_frame_wide_modules_tiles_with_its_step_graphs(tmp_path):
    """LTX (latency, timestep, noise maps cropped per tile): one static engine, a larger frame; an
    engine smaller than a tile and its halo is refused naming the smallest that would serve."""
    model = ltx_teacher()
    assert plan_tiling(model).halo == (8, 8) and not plan_tiling(model).mixing
    export(model, tmp_path / "e19", ExportOptions(chunk="2", height="152", width="152", batch="1"))
    torch.manual_seed(0)
    latents = torch.randn(1, 8, 3, 22, 21)
    expected = model.decode(latents, chunk=2, seed=5, timestep=0.1)
    decoder = tiled(engines.load(tmp_path / "e19"))
    assert decoder.tiling_report(22, 21)["tiles"] == 4
    got = decoder.decode(latents, seed=5, timestep=0.1)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)

    export(model, tmp_path / "e16", ExportOptions(chunk="2", height="128", width="128", batch="1"))
    small = tiled(engines.load(tmp_path / "e16"))
    with pytest.raises(InputError, match=r"height up to 16 latent \(128 px\).*at least 17 latent \(136 px\)"):
        small.decode(latents)


def test_wan_engine_exported_with_tiling_decodes_a_larger_frame(wan):
    """The middle attention's input placed into the whole frame (frame.0), its output cropped per
    tile: flashvaed's runtime (whole clip and a resumed stream) and the manifest-only reader."""
    model, out = wan
    manifest = json.loads((out / "manifest.json").read_text())
    (module,) = manifest["tiling"]["modules"]
    assert module["context"] == "place" and module["name"] == "decoder.middle.blocks.1"
    assert {"tile.first", "tile.steady", "capture.0.first", "capture.0.steady", "frame.0"} <= set(manifest["graphs"])
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 2, 26, 25)  # 2x2 tiles of 24
    expected = model.decode(latents, chunk=1)
    decoder = tiled(engines.load(out))
    assert decoder.tiling_report(26, 25)["tiles"] == 4
    torch.testing.assert_close(decoder.decode(latents), expected, rtol=0, atol=ATOL)

    stream = decoder.stream()  # every tile's state saved, and resumed in another stream
    head = stream.push(latents[:, :, :1])
    resumed = decoder.stream()
    resumed.load_state(stream.save_state())
    torch.testing.assert_close(torch.cat([head, resumed.push(latents[:, :, 1:])], dim=2), expected, rtol=0, atol=ATOL)

    got = manifest_tiled_decode(out, latents.numpy())
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=ATOL)


def test_mochi_engine_exported_with_tiling_sums_group_statistics(tmp_path):
    model = mochi_teacher()
    assert plan_tiling(model).halo == (5, 5) and len(plan_tiling(model).mixing) == 6
    export(model, tmp_path / "m", static(model, 13, tiling=True, tiling_frame="64x64"))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert {m["context"] for m in manifest["tiling"]["modules"]} == {"sum"}
    torch.manual_seed(2)
    latents = torch.randn(1, model.latent_channels, 2, 16, 15)
    expected = model.decode(latents, chunk=1)
    torch.testing.assert_close(tiled(engines.load(tmp_path / "m")).decode(latents), expected, rtol=0, atol=ATOL)
    got = manifest_tiled_decode(tmp_path / "m", latents.numpy())
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=ATOL)


def test_export_without_tiling_is_refused_with_a_hint_and_still_decodes_untiled(wan, tmp_path):
    model, out = wan
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["tiling"]
    manifest["graphs"] = {g: v for g, v in manifest["graphs"].items() if g in ("first", "steady")}
    (plain / "manifest.json").write_text(json.dumps(manifest))
    engine = engines.load(plain)
    with pytest.raises(InputError, match="mixes whole frames.*export it again with tiling"):
        tiled(engine)
    torch.manual_seed(3)
    latents = torch.randn(1, 4, 2, 24, 24)
    torch.testing.assert_close(engine.decode(latents, chunk=1), model.decode(latents, chunk=1), rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "tamper, needle",
    [
        (lambda m: m["tiling"]["modules"][0].update(context="mean"), "context must be one of"),
        (lambda m: m["graphs"].pop("frame.0"), "graphs"),
        (lambda m: m["graphs"]["capture.0.steady"]["inputs"].reverse(), "subset of its step's inputs"),
        (lambda m: m["tiling"]["frame"]["height"].update(max=0), "tiling.frame.height"),
    ],
)
def test_tampered_tiling_sections_are_refused_in_one_line(wan, tmp_path, tamper, needle):
    _, out = wan
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    tamper(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=needle):
        engines.load(bad)


def test_frames_beyond_the_tiling_frame_are_refused(wan):
    _, out = wan
    with pytest.raises(InputError, match=r"up to 64 latent \(512 px"):
        tiled(engines.load(out)).decode(torch.zeros(1, 4, 1, 65, 30))


def test_tensorrt_profiles_cover_a_tiled_run(wan):
    """Every graph of a tiled run gets an optimisation profile over exactly its inputs (the pure
    part of the TensorRT build, which cannot run here): frame.0 over the tiling frame."""
    from flashvaed.engines.tensorrt_backend import _profile_shapes
    from flashvaed.export.contract import read_manifest

    _, out = wan
    contract = read_manifest(out)
    assert _profile_shapes(contract, "frame.0") == {"input": ((1, 16, 1, 1, 1), (1, 16, 1, 64, 64), (1, 16, 1, 64, 64))}
    capture = _profile_shapes(contract, "capture.0.steady")
    assert list(capture) == contract.tiling.capture_inputs["capture.0.steady"] and capture["latents"][2] == (
        1,
        4,
        1,
        24,
        24,
    )
    assert _profile_shapes(contract, "tile.steady")["context/0"] == ((1, 16, 1, 24, 24),) * 3
