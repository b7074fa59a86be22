"""Tensor files and videos in and out: latents, raw frames, mp4 (PyAV) and PNG folders.

Readers refuse bad files with a one-line ``InputError``; writers produce their output whole or
not at all (``atomic_output``). Frames are float tensors in [-1, 1], (B, 3, F, H, W).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_output
from .errors import InputError
from .safeload import check_budget, check_file, json_format, load_npy, load_weights_only

TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi")
RANGE_SLACK = 1e-3  # float frames may overshoot [-1, 1] by rounding, e.g. a decoder's output
VIDEO_COPY_BYTES = 1 + 4 + 4  # per pixel channel: the uint8 frame, its float copy, a resized/cropped copy


# ---------------------------------------------------------------------------------------------
# tensor files
# ---------------------------------------------------------------------------------------------
def read_tensor(path: str | os.PathLike, key: str) -> Tensor:
    """One tensor from .pt (a tensor or a dict holding ``key``), .npy or .safetensors."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise InputError(f"unknown extension {path.suffix!r} for {path} (expected {', '.join(TENSOR_SUFFIXES)})")
    if suffix == ".pt" or suffix == ".pth":
        obj: object = load_weights_only(path, InputError)
    elif suffix == ".npy":
        obj = torch.from_numpy(load_npy(path, InputError))
    else:
        check_file(path, InputError)
        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"cannot read {path}: {first_line}") from None
    if isinstance(obj, dict):
        if key in obj:
            obj = obj[key]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise InputError(f"{path} holds {sorted(obj)[:5]} but no {key!r} entry")
    if not isinstance(obj, Tensor):
        raise InputError(f"{path} does not hold a tensor (found {type(obj).__name__})")
    return obj


def write_tensor(tensor: Tensor, path: str | os.PathLike, key: str) -> Path:
    """Write ``tensor`` as .pt (a dict ``{key: tensor}``), .npy or .safetensors, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise InputError(f"unknown extension {path.suffix!r} for {path} (expected {', '.join(TENSOR_SUFFIXES)})")
    tensor = tensor.detach().cpu().contiguous()
    with atomic_output(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, tensor.numpy())
        elif suffix == ".safetensors":
            save_file({key: tensor}, str(tmp))
        else:
            torch.save({key: tensor}, str(tmp))
    return path


# ---------------------------------------------------------------------------------------------
# frame sinks: where decoded chunks go, one chunk at a time
# ---------------------------------------------------------------------------------------------
def to_uint8(frames: Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8, converted where the frames are (on a GPU, the
    host receives a quarter of the float32 bytes, already in the layout the encoders read)."""
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    return (x if x.device.type == "cpu" else x.contiguous()).cpu().numpy()


def output_kind(out: str | os.PathLike) -> Literal["tensor", "video", "png"]:
    """What ``out`` will hold: by its extension, and an existing directory holds PNG frames."""
    out = Path(out)
    suffix = out.suffix.lower()
    if out.is_dir() and not out.is_symlink() and suffix not in (*TENSOR_SUFFIXES, ".mp4"):
        return "png"
    if suffix in TENSOR_SUFFIXES:
        return "tensor"
    if suffix == ".mp4":
        return "video"
    if suffix == "":
        return "png"
    raise InputError(
        f"unknown output extension {out.suffix!r} (use .pt/.npy/.safetensors for raw frames, "
        ".mp4 for video, or a directory for PNG frames)"
    )


class FrameSink:
    """Receives decoded chunks (B, 3, f, H, W) in order; the output appears on ``close``."""

    def write(self, frames: Tensor) -> None:
        raise NotImplementedError


class _TensorSink(FrameSink):
    def __init__(self, path: Path) -> None:
        self.chunks: list[Tensor] = []
        self.path = path

    def write(self, frames: Tensor) -> None:
        self.chunks.append(frames.float().cpu())

    def finish(self, tmp: Path) -> None:
        frames = torch.cat(self.chunks, dim=2)
        suffix = self.path.suffix.lower()
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, frames.numpy())
        elif suffix == ".safetensors":
            save_file({"frames": frames.contiguous()}, str(tmp))
        else:
            torch.save({"frames": frames}, str(tmp))


class _VideoSink(FrameSink):
    def __init__(self, tmp: Path, fps: int, batch_index: int, crf: int = 18) -> None:
        self.container = av.open(str(tmp), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf)}
        self.batch_index = batch_index
        self.sized = False

    def write(self, frames: Tensor) -> None:
        arrays = to_uint8(frames[self.batch_index])
        if not self.sized:
            self.stream.height, self.stream.width = arrays.shape[1:3]
            self.sized = True
        for array in arrays:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                self.container.mux(packet)

    def finish(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


class _PngSink(FrameSink):
    def __init__(self, tmp: Path, batch_index: int) -> None:
        self.dir = tmp
        self.batch_index = batch_index
        self.count = 0
        (tmp / PNG_MARKER).write_text(json.dumps({"format": PNG_FORMAT}))

    def write(self, frames: Tensor) -> None:
        for array in to_uint8(frames[self.batch_index]):
            Image.fromarray(array).save(self.dir / f"frame_{self.count:05d}.png")
            self.count += 1


PNG_DIR = "a folder of decoded frames"
PNG_FORMAT = "flashvaed-frames"
PNG_MARKER = ".flashvaed.json"  # beside the frames: a later decode may replace only folders carrying it


def is_png_dir(path: Path) -> bool:
    """Whether ``path`` is frames flashvaed wrote (by its marker, never by its file names: a folder
    of someone's own ``frame_00000.png`` must survive)."""
    return path.is_dir() and json_format(path / PNG_MARKER) == PNG_FORMAT


MAX_FPS = 1000  # frame rates of written videos: far past any real video, well inside the container's


def check_fps(fps: int) -> None:
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= MAX_FPS:
        raise InputError(f"{{fps}} must be a whole number of frames per second in [1, {MAX_FPS}], got {fps!r}", "fps")


@contextmanager
def frame_sink(out: str | os.PathLike, fps: int = 16, batch_index: int = 0) -> Iterator[FrameSink]:
    """Open a sink for ``out`` by its extension: raw tensor file, .mp4, or a PNG directory."""
    out = Path(out)
    kind = output_kind(out)
    check_fps(fps)
    if kind == "png":
        with atomic_output(out, directory=True, replaceable=is_png_dir, what=PNG_DIR) as tmp:
            yield _PngSink(tmp, batch_index)
    elif kind == "video":
        with atomic_output(out) as tmp:
            sink = _VideoSink(tmp, fps, batch_index)
            try:
                yield sink
            except BaseException:
                with contextlib.suppress(Exception):
                    sink.container.close()
                raise
            sink.finish()
    else:
        with atomic_output(out) as tmp:
            tensor_sink = _TensorSink(out)
            yield tensor_sink
            tensor_sink.finish(tmp)


def write_video(frames: Tensor, out: str | os.PathLike, fps: int = 16, batch_index: int = 0) -> Path:
    with frame_sink(out, fps=fps, batch_index=batch_index) as sink:
        sink.write(frames)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# reading videos
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoOptions:
    """How a video becomes encoder input.

    ``height``/``width``: target size (scaled to cover it, then centre-cropped); ``None`` keeps
    the size, brought to multiples of ``multiple`` by ``fit``: ``crop`` (centre crop) or
    ``resize``. ``frames``: ``trim`` drops trailing frames down to 4n+1, ``pad`` repeats the
    last frame up to 4n+1. ``max_frames`` caps the clip; ``stride`` keeps every n-th frame.
    """

    height: int | None = None
    width: int | None = None
    fit: Literal["crop", "resize"] = "crop"
    frames: Literal["trim", "pad"] = "trim"
    max_frames: int | None = None
    stride: int = 1
    start: int = 0
    multiple: int = 8
    temporal_factor: int = 4

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % self.multiple):
                raise InputError(f"{{{name}}} must be a positive multiple of {self.multiple}, got {v}", name)
        if self.fit not in ("crop", "resize"):
            raise InputError(f"fit must be 'crop' or 'resize', got {self.fit!r}")
        if self.frames not in ("trim", "pad"):
            raise InputError(f"frames must be 'trim' or 'pad', got {self.frames!r}")
        if self.stride < 1 or self.start < 0 or (self.max_frames is not None and self.max_frames < 1):
            raise InputError("stride and max_frames must be >= 1 and start >= 0")


def decode_video_file(path: str | os.PathLike, options: VideoOptions | None = None) -> np.ndarray:
    """RGB frames (F, H, W, 3) uint8 of a video file, after start/stride/max_frames.

    The frames' memory (and that of their float copies downstream) is checked against the
    machine's before decoding, from the sizes the file declares, and again as frames arrive:
    a tiny file may declare a huge size or frame count.
    """
    options = options or VideoOptions()
    path = Path(path)
    check_file(path, InputError)
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
            declared = stream.frames or 1
            kept = max(1, (declared - options.start + options.stride - 1) // options.stride)
            if options.max_frames is not None:
                kept = min(kept, options.max_frames)
            per_frame = h * w * 3 * VIDEO_COPY_BYTES
            check_budget(kept * per_frame, f"{path} ({kept} frames of {w}x{h})", InputError)
            for i, frame in enumerate(container.decode(video=0)):
                if i < options.start or (i - options.start) % options.stride:
                    continue
                check_budget(
                    (len(frames) + 1) * frame.width * frame.height * 3 * VIDEO_COPY_BYTES,
                    f"{path} ({len(frames) + 1} frames of {frame.width}x{frame.height})",
                    InputError,
                )
                frames.append(frame.to_ndarray(format="rgb24"))
                if options.max_frames is not None and len(frames) >= options.max_frames:
                    break
    except av.FFmpegError as e:
        raise InputError(f"cannot read video {path}: {e}") from None
    if not frames:
        raise InputError(f"{path} holds no video frames")
    return np.stack(frames)


def fit_frames(video: Tensor, options: VideoOptions) -> Tensor:
    """Bring (B, 3, F, H, W) to 4n+1 frames and a size the encoder takes, as ``options`` say."""
    t = video.shape[2]
    tf = options.temporal_factor
    if options.frames == "trim":
        video = video[:, :, : 1 + (t - 1) // tf * tf]
    elif (t - 1) % tf:
        extra = tf - (t - 1) % tf
        video = torch.cat([video, video[:, :, -1:].expand(-1, -1, extra, -1, -1)], dim=2)
    h, w = video.shape[-2:]
    m = options.multiple
    if options.height is not None or options.width is not None:
        th = options.height or max(m, round(h * options.width / w / m) * m)
        tw = options.width or max(m, round(w * options.height / h / m) * m)
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        check_budget(
            video.shape[0] * 3 * video.shape[2] * rh * rw * VIDEO_COPY_BYTES,
            f"fitting the video to {th}x{tw} ({{height}} x {{width}}; {rh}x{rw} before cropping)",
            InputError, "choose a smaller size", ("height", "width"),
        )  # fmt: skip
        video = _resize(video, rh, rw)
        return _center_crop(video, th, tw)
    if h < m or w < m:
        raise InputError(f"video is {h}x{w}, smaller than the minimum {m}x{m}")
    if options.fit == "resize":
        return _resize(video, max(m, round(h / m) * m), max(m, round(w / m) * m))
    return _center_crop(video, h // m * m, w // m * m)


def _resize(video: Tensor, h: int, w: int) -> Tensor:
    if (h, w) == tuple(video.shape[-2:]):
        return video
    b, c, t = video.shape[:3]
    x = video.transpose(1, 2).reshape(b * t, c, *video.shape[-2:])
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.reshape(b, t, c, h, w).transpose(1, 2).clamp(-1, 1)


def _center_crop(video: Tensor, h: int, w: int) -> Tensor:
    top, left = (video.shape[-2] - h) // 2, (video.shape[-1] - w) // 2
    return video[..., top : top + h, left : left + w]


def frames_in_range(video: Tensor, path: Path) -> Tensor:
    """Float frames in [-1, 1]: uint8 frames (0..255) are converted; other ranges are refused."""
    if video.dtype == torch.uint8:
        return video.float() / 127.5 - 1.0
    if not (video.dtype.is_floating_point):
        raise InputError(f"{path}: frames must be float in [-1, 1] or uint8 in [0, 255], got {video.dtype}")
    video = video.float()
    if not torch.isfinite(video).all():
        raise InputError(f"{path}: frames contain NaN or Inf values")
    lo, hi = video.min().item(), video.max().item()
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        hint = " (they look like 0..255 pixel values: save them as uint8)" if hi > 2 else ""
        raise InputError(f"{path}: float frames must lie in [-1, 1], found [{lo:.3g}, {hi:.3g}]{hint}")
    return video.clamp(-1, 1)


def read_video(path: str | os.PathLike, options: VideoOptions | None = None) -> Tensor:
    """A video file or a raw frames tensor file as encoder input (B, 3, 4n+1, H, W) in [-1, 1]."""
    options = options or VideoOptions()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        video = read_tensor(path, "frames")
        if video.dim() != 5 or video.shape[1] != 3:
            raise InputError(f"{path}: frames must be (batch, 3, frames, height, width), got {tuple(video.shape)}")
        if video.shape[2] == 0:
            raise InputError(f"{path}: frames tensor holds zero frames")
        video = frames_in_range(video, path)[:, :, options.start :: options.stride][:, :, : options.max_frames]
    elif suffix in VIDEO_SUFFIXES:
        array = decode_video_file(path, options)
        video = torch.from_numpy(array).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
    else:
        raise InputError(
            f"unknown video extension {path.suffix!r} for {path} "
            f"(expected {', '.join(VIDEO_SUFFIXES + TENSOR_SUFFIXES)})"
        )
    return fit_frames(video, options)
