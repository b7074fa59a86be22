"""Video and tensor IO: fitting frames to the encoder, atomic outputs, synthetic clips."""

from __future__ import annotations

import pytest
import torch

from flashvaed.atomic import atomic_output
from flashvaed.errors import InputError
from flashvaed.io import VideoOptions, fit_frames, read_tensor, write_tensor
from flashvaed.synthetic import synthetic_clip


def test_fit_frames_trim_pad_crop_resize():
    video = torch.linspace(-1, 1, 11).view(1, 1, 11, 1, 1).expand(1, 3, 11, 37, 50).contiguous()
    trimmed = fit_frames(video, VideoOptions())
    assert trimmed.shape == (1, 3, 9, 32, 48)
    assert torch.equal(trimmed[:, :, -1], video[:, :, 8, 2:34, 1:49])  # centre crop, first 9 frames
    padded = fit_frames(video, VideoOptions(frames="pad", fit="resize"))
    assert padded.shape == (1, 3, 13, 40, 48)
    assert torch.allclose(padded[:, :, 12], padded[:, :, 10])  # the last frame repeated
    sized = fit_frames(video, VideoOptions(height=16, width=64))
    assert sized.shape == (1, 3, 9, 16, 64)
    one_side = fit_frames(video, VideoOptions(height=24))
    assert one_side.shape == (1, 3, 9, 24, 32)  # aspect kept, rounded to multiples of 8


def test_video_options_refuse_bad_values():
    with pytest.raises(InputError, match="multiple of 8"):
        VideoOptions(height=30)
    with pytest.raises(InputError):
        VideoOptions(stride=0)
    with pytest.raises(InputError, match="smaller than"):
        fit_frames(torch.zeros(1, 3, 1, 4, 4), VideoOptions())


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o044)  # readable by others


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_tensor_round_trip(tmp_path, suffix):
    x = torch.randn(2, 16, 3, 4, 5)
    write_tensor(x, tmp_path / f"z{suffix}", "latents")
    assert torch.equal(read_tensor(tmp_path / f"z{suffix}", "latents"), x)


def test_synthetic_clips_move_and_are_reproducible():
    a = synthetic_clip(9, 32, 48, seed=3)
    assert a.shape == (1, 3, 9, 32, 48) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, synthetic_clip(9, 32, 48, seed=3))
    assert not torch.equal(a, synthetic_clip(9, 32, 48, seed=4))
    motion = (a[:, :, 1:] - a[:, :, :-1]).abs().mean()
    assert motion > 0.01  # real motion between frames


def test_png_output_replaces_only_folders_it_marked(tmp_path):
    from flashvaed.io import write_video

    write_video(torch.zeros(1, 3, 3, 8, 8), tmp_path / "frames")
    write_video(torch.zeros(1, 3, 2, 8, 8), tmp_path / "frames")  # an earlier run's frames: replaced
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == [".flashvaed.json", "frame_00000.png", "frame_00001.png"]
    (tmp_path / "frames" / "notes.txt").write_text("x")  # still ours, like an export: the marker says so
    write_video(torch.zeros(1, 3, 2, 8, 8), tmp_path / "frames")
    assert not (tmp_path / "frames" / "notes.txt").exists()
    (tmp_path / "theirs").mkdir()  # someone's own frames, named like ours but without the marker
    (tmp_path / "theirs" / "frame_00000.png").write_bytes(b"precious")
    with pytest.raises(InputError, match="not a folder of decoded frames"):
        write_video(torch.zeros(1, 3, 2, 8, 8), tmp_path / "theirs")
    assert (tmp_path / "theirs" / "frame_00000.png").read_bytes() == b"precious"
