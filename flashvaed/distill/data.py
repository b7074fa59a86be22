"""Distillation data: clips of latents (and their frames, when known), deterministic per step.

Three kinds of source, mixed freely:
- videos (files or folders of .mp4/.webm/.mov/.gif/...): clips of ``frames`` (4n+1) frames at
  ``stride``, randomly placed in time, scaled to cover ``size`` and randomly cropped; encoded by
  the frozen teacher encoder, on the fly or once into ``cache_dir``. Unreadable videos are skipped
  with a warning and counted; none readable is an error.
- latents (files or folders of .pt/.npy/.safetensors, (B, z, T, h, w), e.g. sampled by the
  diffusion model the student will serve): random windows of the clip's latent length and size;
  no ground-truth frames.
- ``synthetic``: procedural clips with motion (``flashvaed.synthetic``).

What a step sees depends only on (seed, step, rank, world size): the sampler walks a per-epoch
permutation of all items, and every random choice of an item comes from a generator seeded by
(seed, epoch, item). Resuming at step s therefore sees exactly the data an uninterrupted run sees,
and N processes together see what one process with an N-times larger batch sees.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import atomic_output
from ..errors import InputError
from ..io import TENSOR_SUFFIXES, VIDEO_COPY_BYTES, VIDEO_SUFFIXES, read_tensor
from ..models import families
from ..models.vae import TeacherVAE
from ..safeload import check_budget, check_file
from ..synthetic import synthetic_clip


@dataclass(frozen=True)
class ClipSpec:
    """Clips for one teacher: ``ClipDataset`` sets the factors to its teacher's."""

    frames: int | None = None  # tn+1 video frames per clip (t: the temporal factor); None: the family's
    size: int = 64  # square crop, pixels (a multiple of the spatial factor)
    stride: int = 1  # keep every n-th video frame
    synthetic_clips: int = 64  # distinct synthetic clips
    temporal_factor: int | None = None  # the teacher's factors: None until a teacher is known
    spatial_factor: int | None = None

    def __post_init__(self) -> None:
        tf, sf = self.temporal_factor, self.spatial_factor
        if tf is not None and self.frames is not None and (self.frames < tf + 1 or (self.frames - 1) % tf):
            raise InputError(
                f"clips must have {tf}n+1 >= {tf + 1} frames (two latent frames at least), got {self.frames}"
            )
        if self.size <= 0 or (sf is not None and self.size % sf):
            raise InputError(f"clip size must be a positive multiple of {sf or 1}, got {self.size}")
        if self.stride < 1 or self.synthetic_clips < 1:
            raise InputError("stride and synthetic clip count must be at least 1")

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // self.temporal_factor

    @property
    def latent_size(self) -> int:
        return self.size // self.spatial_factor


@dataclass
class Clip:
    latents: Tensor  # (1, z, T, h, w), normalised diffusion-space latents
    frames: Tensor | None  # (1, 3, F, H, W) in [-1, 1]: ground truth, when the source has it


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(0, max(high, 1), (1,), generator=gen))


class VideoSource:
    def __init__(self, files: list[Path], spec: ClipSpec) -> None:
        self.spec = spec
        self.files: list[Path] = []
        self.lengths: list[int] = []
        self.skipped: list[str] = []
        needed = (spec.frames - 1) * spec.stride + 1
        for f in files:
            try:
                n = _probe(f, spec)
            except (av.FFmpegError, OSError, InputError, StopIteration) as e:
                self.skipped.append(f"{f.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            if n < needed:
                self.skipped.append(f"{f.name}: {n} frames, fewer than the {needed} a clip needs")
                continue
            self.files.append(f)
            self.lengths.append(n)
        for reason in self.skipped:
            warnings.warn(f"skipping video {reason}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.files)

    def frames(self, index: int, gen: torch.Generator) -> Tensor:
        spec = self.spec
        span = (spec.frames - 1) * spec.stride + 1
        start = _randint(gen, self.lengths[index] - span + 1)
        wanted = set(range(start, start + span, spec.stride))
        arrays = []
        with av.open(str(self.files[index])) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    arrays.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if i >= start + span:
                    break
        video = torch.stack(arrays).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
        return random_crop(video, spec.size, gen)


def _probe(path: Path, spec: ClipSpec) -> int:
    """The frame count of a video, refused (InputError) if a clip of it would not fit in memory;
    counted from packets, not decoded frames, where the container does not say."""
    check_file(path, InputError, "video")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError("no video stream")
        stream = container.streams.video[0]
        h, w = stream.codec_context.height, stream.codec_context.width
        check_budget(
            spec.frames * h * w * 3 * VIDEO_COPY_BYTES, f"a clip of {spec.frames} frames of {w}x{h}", InputError
        )
        return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)


def random_crop(video: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Scale (B, 3, F, H, W) so its short side is ``size``, then crop ``size`` x ``size`` at random."""
    b, c, t, h, w = video.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(
            video.transpose(1, 2).reshape(b * t, c, h, w),
            size=(nh, nw),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        video = x.reshape(b, t, c, nh, nw).transpose(1, 2).clamp(-1, 1)
    top, left = _randint(gen, nh - size + 1), _randint(gen, nw - size + 1)
    return video[..., top : top + size, left : left + size].contiguous()


class LatentSource:
    def __init__(self, files: list[Path], spec: ClipSpec, latent_channels: int) -> None:
        self.spec = spec
        self.items: list[tuple[Path, int]] = []
        self.shapes: dict[Path, tuple[int, ...]] = {}
        h = spec.latent_size
        for f in files:
            z = read_tensor(f, "latents")
            if z.dim() != 5 or z.shape[1] != latent_channels:
                raise InputError(f"{f}: latents must be (batch, {latent_channels}, frames, h, w), got {tuple(z.shape)}")
            if z.shape[2] < spec.latent_frames or z.shape[3] < h or z.shape[4] < h:
                raise InputError(
                    f"{f}: latents {tuple(z.shape)} are smaller than a clip "
                    f"({spec.latent_frames} latent frames of {h}x{h})"
                )
            self.shapes[f] = tuple(z.shape)
            self.items += [(f, b) for b in range(z.shape[0])]
        self._cache: dict[Path, Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def latents(self, index: int, gen: torch.Generator) -> Tensor:
        path, b = self.items[index]
        if path not in self._cache:
            self._cache = {path: read_tensor(path, "latents").float()}  # keep one file in memory
        z = self._cache[path][b : b + 1]
        t, h = self.spec.latent_frames, self.spec.latent_size
        t0 = _randint(gen, z.shape[2] - t + 1)
        y0, x0 = _randint(gen, z.shape[3] - h + 1), _randint(gen, z.shape[4] - h + 1)
        return z[:, :, t0 : t0 + t, y0 : y0 + h, x0 : x0 + h].contiguous()


class ClipDataset:
    """All sources as one indexable set of items; ``clip(index, epoch)`` is deterministic."""

    def __init__(
        self,
        data: list[str | os.PathLike],
        teacher: TeacherVAE,
        spec: ClipSpec,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        frames = spec.frames if spec.frames is not None else families.get(teacher.family).clip_frames
        spec = replace(
            spec, frames=frames, temporal_factor=teacher.temporal_factor, spatial_factor=teacher.spatial_factor
        )
        self.teacher, self.spec, self.seed = teacher, spec, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        videos: list[Path] = []
        latents: list[Path] = []
        self.synthetic = 0
        for entry in data:
            if str(entry) == "synthetic":
                self.synthetic = spec.synthetic_clips
                continue
            path = Path(entry)
            if not path.exists():
                raise InputError(f"data not found: {path} (give videos, latents, folders of them, or 'synthetic')")
            if not path.is_dir():
                check_file(path, InputError, "data file")
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            videos += [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
            latents += [p for p in files if p.suffix.lower() in TENSOR_SUFFIXES]
        self.videos = VideoSource(videos, spec)
        if videos and not len(self.videos):
            raise InputError(f"none of the {len(videos)} videos could be read ({self.videos.skipped[0]}, ...)")
        self.latent_source = LatentSource(latents, spec, teacher.latent_channels)
        self.sizes = [len(self.videos), len(self.latent_source), self.synthetic]
        if not sum(self.sizes):
            raise InputError("no training data: no readable videos, no latents, and not 'synthetic'")

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def skipped(self) -> list[str]:
        return self.videos.skipped

    def clip(self, index: int, epoch: int) -> Clip:
        gen = _generator(self.seed, 0 if self.cache_dir else epoch, index)
        if self.cache_dir is not None:
            cached = self.cache_dir / f"clip-{self.seed}-{index}.safetensors"
            if cached.exists():
                return self.cached_clip(cached)
        n_video, n_latent, _ = self.sizes
        if index < n_video:
            frames = self.videos.frames(index, gen)
        elif index < n_video + n_latent:
            return Clip(self.latent_source.latents(index - n_video, gen), None)
        else:
            s = self.spec
            frames = synthetic_clip(s.frames, s.size, s.size, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        with torch.no_grad():
            p = next(self.teacher.parameters())
            latents = self.teacher.encode(frames.to(p.device, p.dtype)).float().cpu()
        clip = Clip(latents, frames)
        if self.cache_dir is not None:
            with atomic_output(self.cache_dir / f"clip-{self.seed}-{index}.safetensors") as tmp:
                save_file({"latents": latents.contiguous(), "frames": frames.contiguous()}, str(tmp))
        return clip

    def cached_clip(self, path: Path) -> Clip:
        """A clip from the latent cache, refused unless it is one this run would have written."""
        s = self.spec
        want = (1, self.teacher.latent_channels, s.latent_frames, s.latent_size, s.latent_size)
        check_file(path, InputError, "cached clip")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            t = {}
        latents, frames = t.get("latents"), t.get("frames")
        if latents is None or tuple(latents.shape) != want or (frames is not None and frames.shape[2] != s.frames):
            raise InputError(
                f"cached clip {path} is unreadable or was made for another run (expected latents {want}); "
                "delete it or choose another {cache_latents}",
                "cache_latents",
            )
        return Clip(latents, frames)


def batch_items(step: int, batch: int, n: int, seed: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """(item index, epoch) of this rank's share of the global batch of ``step``.

    The global batch is positions [step * batch * world, ...) of a stream that walks a fresh
    permutation of all ``n`` items every epoch; rank r takes positions r*batch .. (r+1)*batch - 1.
    """
    items = []
    for j in range(batch):
        position = (step * world + rank) * batch + j
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=_generator(seed, epoch, 7))
        items.append((int(order[offset]), epoch))
    return items


def collate(clips: list[Clip]) -> Clip:
    """Stack clips of equal shape into one batch; frames only if every clip has them."""
    latents = torch.cat([c.latents for c in clips])
    frames = torch.cat([c.frames for c in clips]) if all(c.frames is not None for c in clips) else None
    return Clip(latents, frames)
