"""The command line: outputs of every kind, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flashvaed.cli import app
from flashvaed.models import save_teacher

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(teacher_8, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_teacher(teacher_8, d / "teacher.pth", "original")
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 3, 3, 4)
    torch.save({"latents": latents}, d / "z.pt")
    return d, latents


def test_decode_to_tensor_files_equals_library(teacher_8, files):
    d, latents = files
    expected = teacher_8.decode(latents, chunk=1)
    for name in ("f.pt", "f.npy", "f.safetensors"):
        r = invoke("decode", d / "z.pt", "-m", d / "teacher.pth", "-o", d / name, "--device", "cpu", "-q")
        assert r.exit_code == 0, r.output
        if name.endswith(".pt"):
            got = torch.load(d / name, weights_only=True)["frames"]
        elif name.endswith(".npy"):
            got = torch.from_numpy(np.load(d / name))
        else:
            got = load_file(d / name)["frames"]
        assert got.dtype == torch.float32 and got.shape == (2, 3, 9, 24, 32)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_decode_latent_file_formats(files):
    d, latents = files
    np.save(d / "z.npy", latents.numpy())
    save_file({"latents": latents}, d / "z.safetensors")
    torch.save(latents, d / "bare.pt")  # a bare tensor
    outs = []
    for src in ("z.npy", "z.safetensors", "bare.pt"):
        r = invoke("decode", d / src, "-m", d / "teacher.pth", "-o", d / f"{src}.pt", "--chunk", "2", "-q")
        assert r.exit_code == 0, r.output
        outs.append(torch.load(d / f"{src}.pt", weights_only=True)["frames"])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_decode_to_mp4_and_png(teacher_8, files):
    d, latents = files
    r = invoke("decode", d / "z.pt", "-m", d / "teacher.pth", "-o", d / "v.mp4", "--batch-index", "1", "-q")
    assert r.exit_code == 0, r.output
    with av.open(str(d / "v.mp4")) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (24, 32, 3)
    r = invoke("decode", d / "z.pt", "-m", d / "teacher.pth", "-o", d / "pngs", "--batch-index", "1", "-q")
    assert r.exit_code == 0, r.output
    pngs = sorted((d / "pngs").glob("*.png"))
    assert len(pngs) == 9
    expected = ((teacher_8.decode(latents)[1, :, 4] + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(Image.open(pngs[4])).astype(float) - expected).max() <= 1


def _write_mp4(path, frames_uint8, fps=8):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames_uint8.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "0"}
        for f in frames_uint8:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_encode_video_and_raw_frames(teacher_8, files):
    d, _ = files
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(11, 36, 44, 3), dtype=np.uint8)
    _write_mp4(d / "in.mp4", frames)
    r = invoke("encode", d / "in.mp4", "-m", d / "teacher.pth", "-o", d / "lat.pt", "-q")
    assert r.exit_code == 0, r.output
    lat = torch.load(d / "lat.pt", weights_only=True)["latents"]
    assert lat.shape == (1, 16, 3, 4, 5)  # 11 -> 9 frames (trim), 36x44 -> 32x40 (crop)
    r = invoke("encode", d / "in.mp4", "-m", d / "teacher.pth", "-o", d / "lat2.pt", "--frames", "pad", "-q")
    assert torch.load(d / "lat2.pt", weights_only=True)["latents"].shape[2] == 4  # 11 -> 13 frames

    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    torch.save({"frames": video}, d / "raw.pt")
    r = invoke("encode", d / "raw.pt", "-m", d / "teacher.pth", "-o", d / "lat3.safetensors", "-q")
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(load_file(d / "lat3.safetensors")["latents"], teacher_8.encode(video), atol=1e-6, rtol=0)


def test_encode_gif(files):
    d, _ = files
    images = [Image.fromarray(np.full((24, 32, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    images[0].save(d / "in.gif", save_all=True, append_images=images[1:], duration=100)
    r = invoke("encode", d / "in.gif", "-m", d / "teacher.pth", "-o", d / "g.npy", "-q")
    assert r.exit_code == 0, r.output
    assert np.load(d / "g.npy").shape == (1, 16, 2, 3, 4)


def test_info_counts(teacher_8, files):
    d, _ = files
    r = invoke("info", d / "teacher.pth", "--height", "64", "--width", "96", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["params_total"] == sum(p.numel() for p in teacher_8.parameters())
    assert s["state_bytes"] == 4 * sum(int(np.prod(spec.shape(1, 8, 12))) for spec in teacher_8.decoder_state_specs())
    # planted fact: the head conv (8 -> 3 channels, 3x3x3) on 4 frames of 64x96
    head = next(st for st in s["stages"] if st["name"] == "head")
    assert head["macs"] == 3 * 4 * 64 * 96 * 8 * 27
    assert sum(st["macs"] for st in s["stages"]) <= s["macs_steady"]
    r = invoke("info", d / "teacher.pth", "--height", "64", "--width", "96")
    assert r.exit_code == 0 and "state per stream" in r.output and "up.3" in r.output


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, no output left behind
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(files):
    d, latents = files
    torch.save({"latents": latents[:, :8]}, d / "channels.pt")
    torch.save({"latents": latents[0]}, d / "rank.pt")
    nan = latents.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    torch.save({"latents": nan}, d / "nan.pt")
    torch.save({"latents": latents * float("inf")}, d / "inf.pt")
    torch.save({"latents": latents[:, :, :0]}, d / "empty.pt")
    torch.save({"latents": latents[:, :, :, :0]}, d / "spatial.pt")
    (d / "garbage.pt").write_bytes(b"\x00garbage")
    (d / "z.txt").write_text("1 2 3")
    (d / "corrupt.pth").write_bytes(b"PK\x03\x04broken zip")
    save_file({"text_encoder.weight": torch.zeros(2)}, d / "foreign.safetensors")
    return d


BAD_DECODES = {
    "wrong channel count": ("channels.pt", "teacher.pth", "out.pt", "8 channels"),
    "wrong rank": ("rank.pt", "teacher.pth", "out.pt", "5 dimensions"),
    "nan": ("nan.pt", "teacher.pth", "out.pt", "NaN or Inf"),
    "inf": ("inf.pt", "teacher.pth", "out.pt", "NaN or Inf"),
    "zero frames": ("empty.pt", "teacher.pth", "out.pt", "zero frames"),
    "empty spatial size": ("spatial.pt", "teacher.pth", "out.pt", "spatial size"),
    "missing latents": ("nope.pt", "teacher.pth", "out.pt", "file not found"),
    "unreadable latents": ("garbage.pt", "teacher.pth", "out.pt", "cannot read"),
    "unknown latents extension": ("z.txt", "teacher.pth", "out.pt", "unknown extension"),
    "unknown output extension": ("z.pt", "teacher.pth", "out.avi", "unknown output extension"),
    "missing model": ("z.pt", "nope.pth", "out.pt", "model not found"),
    "corrupt checkpoint": ("z.pt", "corrupt.pth", "out.pt", "cannot read"),
    "foreign checkpoint": ("z.pt", "foreign.safetensors", "out.pt", "not a Wan2.1 VAE"),
    "unknown model extension": ("z.pt", "z.txt", "out.mp4", "unknown checkpoint extension"),
}


@pytest.mark.parametrize("case", list(BAD_DECODES), ids=list(BAD_DECODES))
def test_bad_decode_input(bad, case):
    latents, model, out, needle = BAD_DECODES[case]
    r = invoke("decode", bad / latents, "-m", bad / model, "-o", bad / out, "-q")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    assert "Traceback" not in r.output
    assert not (bad / out).exists()
    assert not list(bad.glob(".out.*")), "temporary output left behind"


@pytest.mark.parametrize(
    "extra, needle",
    [(["--chunk", "0"], "--chunk"), (["--batch-index", "5"], "--batch-index"), (["--dtype", "int8"], "dtype")],
)
def test_bad_decode_options(bad, extra, needle):
    r = invoke("decode", bad / "z.pt", "-m", bad / "teacher.pth", "-o", bad / "o.mp4", "-q", *extra)
    assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output
    assert not (bad / "o.mp4").exists()


def test_bad_encode_input(bad, files):
    cases = [
        (("nope.mp4",), "file not found"),
        (("z.txt",), "unknown video extension"),
        (("garbage.pt",), "cannot read"),
        (("z.pt", "--height", "30"), "multiple of 8"),
    ]
    (bad / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    cases.append((("broken.mp4",), "cannot read video"))
    for args, needle in cases:
        r = invoke("encode", bad / args[0], *args[1:], "-m", bad / "teacher.pth", "-o", bad / "refused.pt", "-q")
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert not (bad / "refused.pt").exists()


def test_failure_midway_leaves_no_output(bad, monkeypatch):
    """An error while frames are being written removes the partial output."""
    from flashvaed.engines.base import Stream
    from flashvaed.errors import InputError

    pushed = []

    def broken(self, latents, final=False):
        pushed.append(1)
        if len(pushed) % 2 == 0:
            raise InputError("simulated failure while decoding")
        return torch.zeros(2, 3, 1, 24, 32)

    monkeypatch.setattr(Stream, "push", broken)
    for out in ("mid.mp4", "mid.pt", "mid_pngs"):
        r = invoke("decode", bad / "z.pt", "-m", bad / "teacher.pth", "-o", bad / out, "-q")
        assert r.exit_code == 2 and "simulated failure" in r.output
        assert not (bad / out).exists()
        assert not list(bad.glob(f".{out}*"))


def test_real_entry_point_prints_one_line(bad):
    """The installed console script, in its own process: one stderr line, exit 2."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashvaed.cli",
            "decode",
            str(bad / "nan.pt"),
            "-m",
            str(bad / "teacher.pth"),
            "-o",
            str(bad / "x.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: latents contain NaN or Inf values"]
    assert proc.stdout == ""


def test_help_names_every_family_and_preset_from_the_registry():
    """The help texts list what is installed (no family named in the CLI's code): a new family or
    preset shows up by itself."""
    from flashvaed.cli import PRESETS
    from flashvaed.models import families
    from flashvaed.models.student import preset_names

    assert sorted(PRESETS) == sorted(families.names())
    assert sorted(p for names in PRESETS.values() for p in names) == sorted(preset_names())
    top = " ".join(runner.invoke(app, ["--help"], terminal_width=400).output.split())
    prune = " ".join(runner.invoke(app, ["prune", "--help"], terminal_width=400).output.split())
    demo = " ".join(runner.invoke(app, ["demo", "--help"], terminal_width=400).output.split())
    for name in families.names():
        assert name in top and name in demo
    for preset in preset_names():
        assert preset in prune
