"""``FlashVAE``: any flashvaed model or engine as the ``vae`` of a diffusers pipeline.

    vae = FlashVAE.from_pretrained("flash-wan21-engine/", teacher="Wan2.1_VAE.pth")
    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", vae=vae)
    pipe.save_pretrained("my-pipeline/")  # my-pipeline/vae: the FlashVAE, which loads back as one

The pipelines of a family's VAE (``Family.pipelines``: ``WanPipeline``, ``LTXPipeline``, ...) read a
handful of facts from their VAE — config fields, compression ratios, latent statistics,
``device``/``dtype`` — and call ``decode(latents[, timestep])`` with *de-normalised* latents, and
``encode(image)`` for image-to-video. ``FlashVAE`` answers exactly those, as the family says
(``Family.pipeline_reads``/``pipeline_fields``), and refuses a pipeline of another family in one line.

Decoding streams chunk by chunk underneath (``Decoder.iter_decode``): memory stays flat in the
clip length. ``enable_tiling`` bounds it in the frame size too, by exact tiling
(``flashvaed.engines.tiled``: the same frames, no blending); ``enable_sharding`` splits every frame
across the ranks of a ``torchrun`` job (``flashvaed.engines.sharded``). LTX-Video
0.9.1's noise injection is drawn from the global torch generator of the decoding device in the
order diffusers' ``AutoencoderKLLTXVideo`` draws it, so with the same ``torch.manual_seed`` the
drop-in over the teacher reproduces diffusers' frames.

FlashVAE is a diffusers ``ModelMixin`` (what pipelines save, load and accept as components) with its
own ``from_pretrained`` (paths, Hugging Face repo ids through huggingface_hub's cache, ``subfolder``,
``torch_dtype``) and ``save_pretrained`` (a self-contained folder); it is none of diffusers' VAE classes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor, nn

try:  # diffusers' base of the models its pipelines save, load and check: FlashVAE is one of them
    from diffusers import ModelMixin  # a name of this module: the pipeline loader looks it up here
except ImportError as e:  # pragma: no cover - the test extra installs diffusers
    raise ImportError("flashvaed.diffusers needs diffusers: pip install 'flashvaed[diffusers]'") from e

from . import engines
from .atomic import atomic_output
from .devices import DTYPES, resolve_device, resolve_dtype
from .engines.base import ContractDecoder
from .engines.tiled import TiledDecoder, choose_tile, parse_memory, parse_tile, tiled
from .errors import CheckpointError, FlashVAEDError, InputError
from .export.contract import is_manifest_dir
from .models import families
from .models.checkpoint import is_student_dir, load_teacher, save_teacher, write_student
from .models.streaming import check_latents
from .models.student import FlashStudent
from .models.vae import LatentDecoder, TeacherVAE
from .safeload import check_stored, load_config, work_budget

__all__ = ["EncoderMissingError", "FamilyMismatchError", "FlashVAE", "resolve_pretrained"]


class FamilyMismatchError(FlashVAEDError):
    """A pipeline of one family given a FlashVAE over a model of another."""


class EncoderMissingError(FlashVAEDError):
    """``encode`` on a FlashVAE whose model has no encoder and no teacher was given."""


def _check_read(family: str, name: str) -> None:
    """Refuse ``name`` ("config.FIELD" or an attribute) if only other families' pipelines read it."""
    ours = families.get(family)
    if name in ours.pipeline_reads:
        return
    theirs = [f.pipelines or f"{f.title} pipelines" for f in families.FAMILIES.values() if name in f.pipeline_reads]
    if theirs:
        raise FamilyMismatchError(
            f"this FlashVAE holds a {ours.title}; {' or '.join(dict.fromkeys(theirs))} need a VAE of their "
            f"family (they asked for {name})"
        )
    raise AttributeError(f"FlashVAE has no {name!r}")


# what diffusers' VAEs take in enable_tiling besides the tile size: blending overlaps and frame
# tiles, which exact tiling and temporal streaming do not need (accepted, ignored with a warning)
IGNORED_TILING_OPTIONS = (
    "tile_sample_stride_height",
    "tile_sample_stride_width",
    "tile_sample_min_num_frames",
    "tile_sample_stride_num_frames",
    "tile_overlap_factor",
    "tile_overlap_factor_height",
    "tile_overlap_factor_width",
)


@dataclass
class _Tiling:
    """What ``enable_tiling`` asked for: a tile size (latent pixels) or none (chosen per decode, within
    ``budget`` bytes or the memory free), and the tiled decoders made so far, by tile size."""

    tile: tuple[int, int] | None
    budget: int | None
    decoders: dict[tuple[int, int] | None, TiledDecoder] = field(default_factory=dict)


class FlashVAEConfig(dict):
    """The config fields a family's pipelines read, with attribute access like diffusers' FrozenDict;
    a field only another family's pipelines read raises ``FamilyMismatchError``."""

    def __init__(self, family: str, fields: dict[str, Any]) -> None:
        super().__init__(fields)
        self._family = family

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name.startswith("_"):
            raise AttributeError(name)
        _check_read(self._family, f"config.{name}")
        raise AttributeError(f"FlashVAE config has no field {name!r}")


class FlashVAE(ModelMixin):
    """A diffusers-compatible VAE over a flashvaed teacher, student, export or engine.

    Decoding streams chunk by chunk, so memory does not grow with the clip; ``enable_tiling()``
    bounds it in the frame size (exact tiles), ``enable_sharding()`` spreads frames over ranks.
    ``enable_slicing()`` is accepted and does nothing.
    """

    def __init__(
        self,
        decoder: engines.Decoder,
        family: str,
        latents_mean: Tensor,
        latents_std: Tensor,
        teacher: LatentDecoder | None = None,
        chunk: int | None = None,
        *,
        config: Any,
        scaling_factor: float = 1.0,
    ) -> None:
        """``config``: the teacher's configuration (the family's ``config_type``); ``scaling_factor``:
        the one ``decoder`` de-normalises with (``LatentDecoder.scaling_factor``)."""
        super().__init__()
        fam = families.get(family)
        if not fam.pipelines:
            raise FamilyMismatchError(f"no diffusers pipeline FlashVAE knows takes a {fam.title}")
        self.decoder = decoder
        self.family = family
        self.kind = fam.diffusers_vae  # the diffusers VAE it stands in for
        self.teacher = teacher  # a registered submodule: moved by .to(), found by offload hooks
        self.chunk = chunk
        self.scaling_factor = float(scaling_factor)
        z = decoder.latent_channels
        self.register_buffer("_mean", latents_mean.float().reshape(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("_std", latents_std.float().reshape(1, z, 1, 1, 1), persistent=False)
        self.config = FlashVAEConfig(family, fam.pipeline_fields(config, decoder))
        self.spatial_compression_ratio = decoder.spatial_factor

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | LatentDecoder,
        teacher: str | os.PathLike | LatentDecoder | None = None,
        *,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        force_download: bool = False,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        providers: list[str] | None = None,
        chunk: int | None = None,
        compile: str | None = None,
        **loader: Any,
    ) -> FlashVAE:
        """MODEL: a teacher checkpoint (any layout), a student, export or engine directory, a folder
        ``save_pretrained`` wrote, or a Hugging Face repo id (``org/name``, from the cache or the Hub:
        ``revision``, ``local_files_only``, ``cache_dir``, ``token``, ``force_download`` as in diffusers).

        ``subfolder``: a folder (or file) inside MODEL, e.g. ``"vae"`` of a pipeline's folder or repo.
        ``teacher`` supplies ``encode`` (image-to-video pipelines) where MODEL has no encoder.
        ``torch_dtype`` (diffusers' name) or ``dtype``: torch models compute in it, engines compute in
        float32 and hand frames over in it; ``vae.dtype`` reports it (default float32).
        ``device``/``compile`` apply to torch models (``compile``: see ``engines.load``, paid once
        per shape); engines take ``providers``. The options diffusers' pipeline loader passes
        (``low_cpu_mem_usage``, ``use_safetensors``, ...) are accepted; those that would ask for
        something FlashVAE does not do (``device_map``, ``quantization_config``, ...) are refused.
        """
        device = _device_of_map(loader.pop("device_map", None), device)
        _check_loader_options(loader)
        dt = _requested_dtype(torch_dtype, dtype)
        dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        path: Path | None = None
        if not isinstance(model, LatentDecoder):  # a loaded model is taken as it is
            path = resolve_pretrained(
                model,
                subfolder=subfolder,
                revision=revision,
                local_files_only=local_files_only,
                cache_dir=cache_dir,
                token=token,
                force_download=force_download,
            )
        saved = _read_saved(path) if path is not None else {}
        if teacher is None and saved.get("teacher"):
            teacher = path / saved["teacher"]  # type: ignore[operator]
        if chunk is None:
            chunk = saved.get("chunk")
        compute = dt or torch.float32
        source = model if path is None else path / saved.get("model", ".")
        # torch models hand their frames back where they run: a GPU pipeline's frames never visit the host
        frames_on = "cpu" if isinstance(source, Path) and is_manifest_dir(source) else "device"
        decoder = engines.load(
            source, device=dev, dtype=compute, providers=providers, compile=compile, frames_on=frames_on
        )
        if isinstance(decoder, engines.TorchDecoder):
            family, config = decoder.model.family, decoder.model.family_config
            mean, std = decoder.model.latents_mean, decoder.model.latents_std
            sf = decoder.model.scaling_factor
            if teacher is None and decoder.model.has_encoder:  # a teacher, or a student carrying its encoder
                teacher = decoder.model
        else:
            contract = decoder.contract  # type: ignore[attr-defined]
            family = contract.model["family"]
            config = _manifest_config(family, contract.model.get("config"), str(path))
            mean = torch.tensor(contract.model["latents_mean"])
            std = torch.tensor(contract.model["latents_std"])
            sf = contract.model.get("scaling_factor", 1.0)
        if teacher is not None and not isinstance(teacher, nn.Module):  # a path
            teacher = load_teacher(teacher).to(dev, compute)
        if teacher is not None and teacher.family != family:
            raise FamilyMismatchError(f"the teacher is a {teacher.family} VAE, the model is {family}")
        vae = cls(decoder, family, mean, std, teacher, chunk, config=config, scaling_factor=sf)
        vae._source = path
        if isinstance(decoder, engines.TorchDecoder):
            vae._device, vae._dtype = dev, compute
        elif dt is not None:
            vae._dtype = dt  # what the pipeline casts latents to and gets frames in
        return vae

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **ignored: Any,
    ) -> Path:
        """Write a folder ``from_pretrained`` reads back, self-contained: the model (a teacher in the
        diffusers layout, a student directory, or a copy of the export or engine directory), the
        teacher that ``encode`` uses where it is another model (``teacher/``), and ``flashvae.json``
        (the chunk). ``pipe.save_pretrained(dir)`` calls this for ``dir/vae``. Written aside, then
        swapped in: an old folder there is replaced whole or not at all.

        ``safe_serialization`` and ``variant`` are diffusers' (the weights are always safetensors);
        ``push_to_hub`` is refused (flashvaed never uploads)."""
        if push_to_hub:
            raise InputError("FlashVAE.save_pretrained does not upload; push the folder with huggingface_hub")
        if variant is not None:
            raise InputError(f"FlashVAE.save_pretrained writes one set of weights, not a {variant!r} variant")
        out = Path(save_directory)
        self._take_over_layer_offload()  # weights back from accelerate's sequential offload, if it hooked us
        model = self.decoder.model if isinstance(self.decoder, engines.TorchDecoder) else None
        source = getattr(self, "_source", None)
        with atomic_output(out, directory=True, replaceable=_replaceable, what="a model folder") as tmp:
            record: dict[str, Any] = {"format": SAVED_FORMAT, "version": 1, "chunk": self.chunk, "teacher": None}
            if isinstance(model, FlashStudent):
                write_student(model, tmp)
            elif model is not None:
                written = _write_teacher(model, tmp, "model")  # type: ignore[arg-type]
                if written != ".":
                    record["model"] = written
            elif source is not None and Path(source).is_dir():
                _copy_folder(Path(source), tmp)
            else:
                raise InputError("this FlashVAE was not loaded from a folder: there is nothing to save")
            if self.teacher is not None and self.teacher is not model:
                record["teacher"] = _write_teacher(self.teacher, tmp, "teacher")  # type: ignore[arg-type]
            (tmp / SAVED_FILE).write_text(json.dumps(record, indent=2))
        return out

    # --- what pipelines read -----------------------------------------------------------------
    _device: torch.device = torch.device("cpu")
    _dtype: torch.dtype = torch.float32
    _source: Path | None = None  # the folder or file it was loaded from
    _tiling: _Tiling | None = None  # on: enable_tiling's request
    _last_tiling: _Tiling | None = None  # kept by disable_tiling, for an enable_tiling() without sizes
    _sharded: engines.Decoder | None = None  # on: the decoder across ranks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def temporal_compression_ratio(self) -> int:
        """For families whose pipelines read it (``Family.pipeline_reads``); refused for the others."""
        _check_read(self.family, "temporal_compression_ratio")
        return self.decoder.temporal_factor

    @property
    def latents_mean(self) -> Tensor:
        """LTX pipelines read the statistics as (C,) tensors (Wan pipelines read ``config``)."""
        return self._mean.flatten()

    @property
    def latents_std(self) -> Tensor:
        return self._std.flatten()

    def to(self, *args: Any, **kwargs: Any) -> FlashVAE:
        """Moves a torch model and the teacher; engines keep running where they were built to."""
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
        nn.Module.to(self, *args, **kwargs)  # not ModelMixin.to: its quantisation checks do not apply, and it warns of
        # float32 modules (none here) on every cast
        if isinstance(self.decoder, engines.TorchDecoder):
            self.decoder.model.to(device=device, dtype=dtype)
            if device is not None:
                self._device = torch.device(device)
            if dtype is not None:
                self._dtype = dtype
            p = next(self.decoder.model.parameters())  # what memory estimates (tile choice) read
            self.decoder.dtype, self.decoder.device = p.dtype, p.device
        return self

    # --- tiling and sharding: memory bounded in the frame size, or spread over ranks -----------
    @property
    def use_tiling(self) -> bool:
        """Whether decoding tiles; setting it, as diffusers allows, enables or disables tiling."""
        return self._tiling is not None

    @use_tiling.setter
    def use_tiling(self, value: bool) -> None:
        if value:
            self.enable_tiling()
        else:
            self.disable_tiling()

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        *more: Any,
        tile: tuple[int, int] | str | int | None = None,
        max_memory: str | int | None = None,
        tile_sample_min_size: int | None = None,
        **ignored: Any,
    ) -> None:
        """Decode every frame as exact tiles: the frames untiled decoding gives, at the memory of a tile.

        The tile size, at most one of: ``tile`` (latent pixels per tile, halo included: ``(h, w)``,
        ``"HxW"`` or ``N``; refused below the halo's minimum); diffusers' ``tile_sample_min_height`` /
        ``tile_sample_min_width`` / ``tile_sample_min_size`` (pixels; raised, with a warning, to at
        least four halos, so that halos stay at most half of each tile); ``max_memory`` (``"8GB"``:
        the largest tile whose decode fits). With none, the sizes of the last call, else automatic:
        tiles only where a decode would not fit the memory free on the device, as large as fits
        (an engine: at the size it was built for, for frames larger than that). diffusers' strides,
        overlaps, frame counts and further positional options are accepted and ignored (one warning).
        """
        unknown = sorted(set(ignored) - set(IGNORED_TILING_OPTIONS))
        if unknown:
            raise TypeError(f"enable_tiling() got an unexpected keyword argument {unknown[0]!r}")
        if ignored or more:
            names = sorted(ignored) + ([f"{len(more)} positional option(s) after the tile size"] if more else [])
            warnings.warn(
                f"FlashVAE tiling is exact (each tile reads its halo; nothing is blended) and decoding already "
                f"streams in time, so {', '.join(names)} change nothing",
                stacklevel=2,
            )
        if self._sharded is not None:
            raise InputError("this FlashVAE shards frames across ranks: disable_sharding() before enable_tiling()")
        pixels = (tile_sample_min_height, tile_sample_min_width, tile_sample_min_size)
        given = [n for n, v in (("tile", tile), ("max_memory", max_memory)) if v is not None]
        given += ["tile_sample_min_height/width/size"] if any(v is not None for v in pixels) else []
        if len(given) > 1:
            raise InputError(f"give one tile size, not {' and '.join(given)}")
        if not given and self._last_tiling is not None:
            self._tiling = self._last_tiling  # diffusers keeps the sizes given before
            return
        self._tiling = self._last_tiling = self._new_tiling(tile, pixels, max_memory)

    def disable_tiling(self) -> None:
        """Decode whole frames again (the sizes are kept for the next ``enable_tiling()``)."""
        self._tiling = None

    def _new_tiling(
        self, tile: tuple[int, int] | str | int | None, pixels: tuple[int | None, ...], max_memory: str | int | None
    ) -> _Tiling:
        """The tiling a call asks for, checked against the decoder's halo now, not at the first decode."""
        whole = tiled(self.decoder)  # the halo; refuses a decoder that cannot tile (in one line)
        halo = whole.halo
        least = (2 * halo[0] + 1, 2 * halo[1] + 1)
        if tile is not None:
            size = parse_tile(str(tile) if isinstance(tile, int) and not isinstance(tile, bool) else tile)
            assert size is not None
            if size[0] < least[0] or size[1] < least[1]:
                raise InputError(
                    f"{{tile}} {size[0]}x{size[1]} latent pixels cannot hold this decoder's halo of "
                    f"{halo[0]}x{halo[1]} on both sides: tiles need at least {least[0]}x{least[1]}",
                    "tile",
                )
            self._check_engine_tile(size)
            return _Tiling(size, None, {None: whole})
        if any(v is not None for v in pixels):
            size = self._tile_of_pixels(*pixels, halo)
            self._check_engine_tile(size)
            return _Tiling(size, None, {None: whole})
        if max_memory is not None and not self._on_torch:
            raise InputError("{max_memory} picks tiles for torch models; an engine tiles at its size", "max_memory")
        budget = parse_memory(max_memory) if max_memory is not None else None
        return _Tiling(None, budget, {None: whole})

    def _check_engine_tile(self, size: tuple[int, int]) -> None:
        """Refuse now a tile an engine cannot decode (its regions: the tile, at most the engine's size)."""
        if not isinstance(self.decoder, ContractDecoder):
            return
        shapes, s = self.decoder.contract.shapes, self.decoder.spatial_factor
        for what, value in (("height", size[0]), ("width", size[1])):
            r = shapes[what]
            if min(value, r.max) not in r:
                raise InputError(
                    f"{{tile}} {size[0]}x{size[1]} latent pixels: this engine was built for {what} {r.describe()} "
                    f"latent ({r.min * s}..{r.max * s} px); give tiles of at least {r.min}",
                    "tile",
                )

    def _tile_of_pixels(
        self, height: int | None, width: int | None, size: int | None, halo: tuple[int, int]
    ) -> tuple[int, int]:
        """diffusers' tile size (pixels) in latent pixels, raised to four halos where smaller: the
        smallest tile that holds a halo on each side would spend nearly all its work on the halos."""
        s = self.decoder.spatial_factor
        h = height if height is not None else width if width is not None else size
        w = width if width is not None else height if height is not None else size
        for name, v in (("tile_sample_min_height", h), ("tile_sample_min_width", w)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive whole number of pixels, got {v!r}")
        assert h is not None and w is not None
        asked = (h // s, w // s)
        floor = (max(4 * halo[0], 2 * halo[0] + 1), max(4 * halo[1], 2 * halo[1] + 1))
        size_ = (max(asked[0], floor[0]), max(asked[1], floor[1]))
        if size_ != asked:
            warnings.warn(
                f"tiles of {h}x{w} px are {asked[0]}x{asked[1]} latent pixels, small for this decoder's halo of "
                f"{halo[0]}x{halo[1]} on each side: FlashVAE decodes tiles of {size_[0]}x{size_[1]} latent "
                f"pixels ({size_[0] * s}x{size_[1] * s} px) instead (tile=(h, w) takes latent sizes down to "
                f"{2 * halo[0] + 1}x{2 * halo[1] + 1})",
                stacklevel=4,
            )
        return size_

    def _spatial(self, shape: tuple[int, ...]) -> engines.Decoder:
        """The decoder a decode of latents of ``shape`` runs: sharded, tiled where a frame takes more
        than one tile, or the model's own (a single tile is the whole frame: no tiling work)."""
        if self._sharded is not None:
            return self._sharded
        tiling = self._tiling
        if tiling is None:
            return self.decoder
        size = tiling.tile
        if size is None and self._on_torch:
            budget = tiling.budget if tiling.budget is not None else work_budget(self._device)
            try:
                size = choose_tile(self.decoder, shape, self.chunk or self.decoder.default_chunk(), budget)
            except InputError as e:
                if tiling.budget is not None:
                    raise
                raise InputError(e.render(lambda _: "the memory free for decoding here:")) from None
            if size is None:
                return self.decoder
        decoder = tiling.decoders.get(size)
        if decoder is None:
            decoder = tiling.decoders[size] = tiled(self.decoder, size)
        return self.decoder if len(decoder.grid(shape[3], shape[4])) == 1 else decoder

    @property
    def use_sharding(self) -> bool:
        """Whether every frame is decoded across the ranks of a torchrun job."""
        return self._sharded is not None

    def enable_sharding(self, gather: str = "all", *, group: Any = None) -> None:
        """Decode every frame across the ranks of a ``torchrun`` job, one band each
        (``flashvaed.engines.sharded``; torch models): memory per rank falls with the ranks.

        Every rank runs the pipeline and calls this and every ``decode`` with the same latents (the
        same seeds); a difference is refused on every rank in one line. ``gather="all"``: the frames
        come back on every rank, as pipelines post-process on every rank; ``"rank0"``: on rank 0,
        the others get (B, 3, F, 0, W) empty frames. ``group``: a process group (default: torchrun's,
        initialised here if it is not yet)."""
        if self._tiling is not None:
            raise InputError("this FlashVAE tiles frames: disable_tiling() before enable_sharding()")
        from .engines.sharded import sharded

        self._sharded = sharded(self.decoder, group=group, gather=gather)

    def disable_sharding(self) -> None:
        """Decode whole frames on each rank again."""
        self._sharded = None

    def enable_slicing(self) -> None:
        """A no-op: batch elements already share one streaming pass of bounded memory."""

    def disable_slicing(self) -> None:
        """A no-op (see ``enable_slicing``)."""

    @contextmanager
    def _offload_hooks(self) -> Iterator[None]:
        """What diffusers' ``apply_forward_hook`` does for ``decode``/``encode``, which are no
        ``forward``: let model CPU offload move us first (``enable_model_cpu_offload``). Under
        sequential CPU offload (``enable_sequential_cpu_offload``), accelerate hooks every layer to
        fetch its weights for its own ``forward``; streaming decoders also read weights and buffers
        outside those calls, so FlashVAE takes the layers' hooks off and offloads as one: the whole
        model moves to the execution device for the call and back to the CPU after it."""
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward") and any(True for _ in self.parameters()):
            hook.pre_forward(self)  # (an engine has no torch weights to move, and accelerate needs one)
        self._take_over_layer_offload()
        device = self._sequential_device
        if device is None or not self._on_torch:
            yield
            return
        self.to(device)
        try:
            yield
        finally:
            self.to("cpu")

    _sequential_device: torch.device | None = None  # under sequential CPU offload: where calls run

    def _take_over_layer_offload(self) -> None:
        layers = [m for m in self.modules() if m is not self and _offloading(getattr(m, "_hf_hook", None))]
        device = None
        for m in layers:
            hook = _offloading(m._hf_hook)
            device = device or hook.execution_device
            for name, tensor in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                if tensor.device.type == "meta" and name in hook.weights_map:  # back from accelerate's CPU copy
                    value = hook.weights_map[name]
                    if name in m._parameters:
                        m._parameters[name] = nn.Parameter(value, requires_grad=tensor.requires_grad)
                    else:
                        m._buffers[name] = value
            del m._hf_hook  # what accelerate's remove_hook_from_module does, without putting weights on devices
            if hasattr(m, "_old_forward"):
                m.forward = m._old_forward
                del m._old_forward
        if layers:
            self._sequential_device = torch.device(device) if device is not None else None
            self.to("cpu")

    # --- decode / encode ---------------------------------------------------------------------
    def decode(self, z: Tensor, temb: Tensor | None = None, return_dict: bool = True) -> Any:
        """Frames (B, 3, F, H, W) in [-1, 1] from de-normalised latents (what pipelines pass)."""
        with self._offload_hooks():
            return self._decode(z, temb, return_dict)

    def _decode(self, z: Tensor, temb: Tensor | None, return_dict: bool) -> Any:
        z, decoder = self._checked(z)
        latents = z.float().to(self._mean.device) - self._mean  # pipelines de-normalised them
        if self.scaling_factor != 1.0:
            latents = latents * self.scaling_factor
        latents = latents / self._std
        options: dict[str, Any] = {}
        if temb is not None:
            if "timestep" not in self.decoder.step_inputs:
                raise FamilyMismatchError("a timestep was given, but this FlashVAE's model is not timestep-conditioned")
            options["timestep"] = torch.as_tensor(temb, dtype=torch.float32).flatten().cpu()
        generator = None
        if _noise_scales(self.decoder):  # draw the injected noise where diffusers' VAE would: the global generator
            generator = torch.Generator(device=self._device)
            generator.set_state(_global_rng_state(self._device))
            options["generator"] = generator
        frames = decoder.decode(latents.cpu() if not self._on_torch else latents, self.chunk, **options)
        if generator is not None:
            _set_global_rng_state(self._device, generator.get_state())
        frames = frames.to(self._device, self._dtype)
        if not return_dict:
            return (frames,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=frames)

    def _checked(self, z: Any) -> tuple[Tensor, engines.Decoder]:
        """The latents a pipeline passed, refused as the CLI refuses them (same words), but as the
        ``TypeError``/``ValueError`` Python callers expect, before any cast could hide a problem;
        and the decoder that will decode them (``_spatial``). Sharded, every rank refuses alike."""
        if not isinstance(z, Tensor):
            raise TypeError(f"latents must be a torch tensor, got {type(z).__name__}")
        error: InputError | None = None
        decoder: engines.Decoder = self.decoder
        try:
            if z.device.type == "meta":
                raise InputError("latents are on the meta device: they hold no values to decode")
            if not z.is_floating_point():
                raise InputError(f"latents must be floating point, got {z.dtype}")
            check_stored([z], Path("latents"), InputError)
            check_latents(self.decoder, z)
            decoder = self._spatial(tuple(z.shape))
            decoder.check_memory(tuple(z.shape), self.chunk)
        except InputError as e:
            error = e
        if self._sharded is not None:  # one rank's refusal (its memory) must not leave the others waiting
            try:
                self._sharded.agree("check", {}, None if error is None else str(error))  # type: ignore[attr-defined]
            except InputError as e:
                error = e
        if error is not None:
            raise ValueError(str(error)) from None
        return z, decoder

    @property
    def _on_torch(self) -> bool:
        return isinstance(self.decoder, engines.TorchDecoder)

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        """The teacher's posterior of frames in [-1, 1] (mean and log-variance, in the VAE's own latent
        space), as diffusers' VAE returns it: ``sample(generator)`` draws as diffusers' does."""
        if self.teacher is None:
            raise EncoderMissingError(
                "this FlashVAE's model has no encoder; pass teacher=<the teacher checkpoint> to "
                "FlashVAE.from_pretrained for image-to-video pipelines"
            )
        with torch.no_grad(), self._offload_hooks():
            mean, logvar = self.teacher.posterior(x)
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1).to(self._dtype))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def forward(self, z: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.decode(z, temb, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained: where a model is, and the folder FlashVAE writes
# ---------------------------------------------------------------------------------------------
SAVED_FILE = "flashvae.json"  # beside the model in a folder save_pretrained wrote
SAVED_FORMAT = "flashvaed-flashvae"
PIPELINE_INDEX = "model_index.json"  # what marks a diffusers pipeline's root folder

# what diffusers' pipeline loader passes every ModelMixin component (pipeline_loading_utils.load_sub_model):
# the values it passes by default are accepted; anything else asks for what FlashVAE does not do
_LOADER_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "device_map": (None,),
    "max_memory": (None,),
    "offload_folder": (None,),
    "offload_state_dict": (None, False, True),
    "variant": (None,),
    "use_safetensors": (None, False, True),
    "low_cpu_mem_usage": (None, False, True),
    "use_flashpack": (None, False),
    "disable_mmap": (None, False, True),
    "quantization_config": (None,),
    "proxies": (None,),
    "output_loading_info": (None, False),
}


def _check_loader_options(options: dict[str, Any]) -> None:
    for name, value in options.items():
        if name not in _LOADER_DEFAULTS:
            raise TypeError(f"FlashVAE.from_pretrained() got an unexpected keyword argument {name!r}")
        if not any(value is v or (v is not None and value == v) for v in _LOADER_DEFAULTS[name]):
            raise InputError(f"FlashVAE.from_pretrained does not take {name}={value!r:.60} (diffusers' option)")


def _device_of_map(device_map: Any, device: str | torch.device) -> str | torch.device:
    """diffusers' ``device_map`` for one component, where it names one device (a pipeline loaded with
    ``device_map="cuda"`` passes ``{"": "cuda"}``); a map that splits a model is refused."""
    if device_map is None:
        return device
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"cuda:{device_map}"
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        return device_map if isinstance(device_map, torch.device) else str(device_map)
    raise InputError(f"FlashVAE.from_pretrained takes a device_map that names one device, not {device_map!r:.60}")


def _requested_dtype(torch_dtype: torch.dtype | str | None, dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch_dtype`` (diffusers' name) or ``dtype`` (flashvaed's), as a torch dtype; None: neither."""
    chosen = []
    for name, value in (("torch_dtype", torch_dtype), ("dtype", dtype)):
        if value is None:
            continue
        if isinstance(value, str):
            value = resolve_dtype(value.removeprefix("torch."))
        if value not in DTYPES.values():
            raise InputError(f"{name} must be one of {', '.join(DTYPES)}, got {value}")
        chosen.append(value)
    if len(chosen) == 2 and chosen[0] != chosen[1]:
        raise InputError(f"torch_dtype={chosen[0]} and dtype={chosen[1]} disagree: give one")
    return chosen[0] if chosen else None


def _subfolder_parts(subfolder: str | None) -> tuple[str, ...]:
    """The parts of a ``subfolder``, which must stay inside the folder it is looked up in."""
    if subfolder is None:
        return ()
    if not isinstance(subfolder, str):
        raise InputError(f"subfolder must be a relative path, got {subfolder!r:.60}")
    posix = PurePosixPath(subfolder.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(subfolder).is_absolute() or PureWindowsPath(subfolder).drive:
        raise InputError(f"subfolder must be a path inside the model folder, not an absolute path ({subfolder!r:.80})")
    parts = tuple(p for p in posix.parts if p != ".")
    if ".." in parts:
        raise InputError(f"subfolder must stay inside the model folder, got {subfolder!r:.80}")
    if not parts:
        raise InputError("subfolder is empty; leave it out to load the folder itself")
    return parts


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_]$")


def _is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_snapshot(
    repo_id: str,
    parts: tuple[str, ...],
    *,
    revision: str | None,
    local_files_only: bool | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    force_download: bool,
) -> Path:
    """The local snapshot of ``repo_id`` (the subfolder's files only, where one is given), from the
    Hugging Face cache or downloaded into it; one line for any failure, naming the repo."""
    try:
        import huggingface_hub as hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise InputError(f"{repo_id} is no local path, and huggingface_hub (to read repos) is not installed") from None
    offline = bool(local_files_only) or _env_true("HF_HUB_OFFLINE") or hub.constants.HF_HUB_OFFLINE
    if cache_dir is None and os.environ.get("HF_HUB_CACHE"):
        cache_dir = os.environ["HF_HUB_CACHE"]  # set after huggingface_hub read its environment
    at = f" at revision {revision}" if revision else ""

    def snapshot(patterns: list[str] | None) -> Path:
        try:
            folder = hub.snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=offline,
                token=token,
                force_download=force_download,
                allow_patterns=patterns,
                library_name="flashvaed",
            )
        except LocalEntryNotFoundError:
            where = "offline: local_files_only" if local_files_only else "offline (HF_HUB_OFFLINE)"
            if not offline:
                where = "the Hub could not be reached"
            raise InputError(
                f"{repo_id}{at} is neither a local path nor in the Hugging Face cache ({where}); "
                "download it once online, or give a local folder"
            ) from None
        except (HfHubHTTPError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{repo_id}{at}: {first[:200]}") from None
        return Path(folder)

    if parts:
        inside = "/".join(parts)
        return snapshot([inside, f"{inside}/*"])
    root = snapshot([PIPELINE_INDEX])  # a pipeline's repo is refused before its weights are fetched
    if (root / PIPELINE_INDEX).is_file():
        return root
    return snapshot(None)


def resolve_pretrained(
    model: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """The local path ``FlashVAE.from_pretrained`` loads: ``model`` (a path, else a Hugging Face
    repo id), then ``subfolder`` inside it. A pipeline's root folder without ``subfolder`` is
    refused in one line that says to pass ``subfolder="vae"``."""
    parts = _subfolder_parts(subfolder)
    root = Path(model)
    if not root.exists() and not root.is_symlink():
        if not _is_repo_id(str(model)):
            raise CheckpointError(f"model not found: {model}")
        root = _hub_snapshot(
            str(model),
            parts,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            token=token,
            force_download=force_download,
        )
    if parts:
        if not root.is_dir():
            raise InputError(f"{model} is a file; subfolder={subfolder!r} needs a folder")
        path = root.joinpath(*parts)
        if not path.exists():
            raise CheckpointError(f"{model} has no {'/'.join(parts)}")
        return path
    if root.is_dir() and (root / PIPELINE_INDEX).is_file() and not _is_model_dir(root):
        vaes = _pipeline_vaes(root)
        raise InputError(
            f"{model} is a diffusers pipeline folder ({PIPELINE_INDEX}); pass "
            + " or ".join(f'subfolder="{v}"' for v in vaes)
            + " to load its VAE"
        )
    return root


def _pipeline_vaes(root: Path) -> list[str]:
    """The components of a pipeline folder that hold its VAE (``vae`` when the index does not say)."""
    try:
        index = load_config(root / PIPELINE_INDEX, CheckpointError, "pipeline index")
    except CheckpointError:
        return ["vae"]
    if not isinstance(index, dict):
        return ["vae"]
    found = [
        name
        for name, value in index.items()
        if isinstance(value, list) and len(value) == 2 and str(value[1]).startswith(("AutoencoderKL", "FlashVAE"))
    ]
    return found or ["vae"]


def _is_model_dir(path: Path) -> bool:
    """A folder FlashVAE loads or may replace: ours, a student, an export or engine, a diffusers model."""
    return (
        (path / SAVED_FILE).is_file()
        or is_student_dir(path)
        or is_manifest_dir(path)
        or (path / "config.json").is_file()
    )


def _replaceable(path: Path) -> bool:
    return _is_model_dir(path) and not (path / PIPELINE_INDEX).is_file()


def _read_saved(path: Path) -> dict[str, Any]:
    """``flashvae.json`` of a folder ``save_pretrained`` wrote ({} elsewhere), checked."""
    file = path / SAVED_FILE
    if not path.is_dir() or not file.is_file():
        return {}
    record = load_config(file, CheckpointError, "FlashVAE record")  # size-capped, malformed in one line
    if not isinstance(record, dict) or record.get("format") != SAVED_FORMAT:
        raise CheckpointError(f"{file} is not a FlashVAE record (format {SAVED_FORMAT})")
    if record.get("version", 1) != 1:
        raise CheckpointError(f"{file} was written by a newer flashvaed (version {record.get('version')!r:.20})")
    chunk, teacher, model = record.get("chunk"), record.get("teacher"), record.get("model")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise CheckpointError(f"{file}: chunk must be a positive whole number or null, got {chunk!r:.40}")
    # the names save_pretrained writes, and nothing else: a folder teacher/ or a file beside this record
    folder_teacher = teacher == "teacher" and (path / "teacher").is_dir()
    if teacher is not None and not (folder_teacher or (teacher == TEACHER_FILE and _plain_file(path / teacher))):
        raise CheckpointError(f"{file}: teacher must name teacher/ or {TEACHER_FILE} beside it, got {teacher!r:.60}")
    if model is not None and not (model == MODEL_FILE and _plain_file(path / model)):
        raise CheckpointError(f"{file}: model must be absent or name {MODEL_FILE} beside it, got {model!r:.60}")
    return record


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


MODEL_FILE, TEACHER_FILE = "model.safetensors", "teacher.safetensors"


def _write_teacher(model: TeacherVAE, folder: Path, name: str) -> str:
    """Write a teacher into ``folder`` in the diffusers layout (``name`` "model": the folder itself;
    else the subfolder ``name``), or, where its configuration has no diffusers form (the embedded
    LTX teacher's), as one flashvaed-layout file ``name.safetensors``. Returns what was written,
    relative to ``folder``."""
    try:
        save_teacher(model, folder if name == "model" else folder / name, layout="diffusers")
        return "." if name == "model" else name
    except InputError:  # "cannot write this ... in the diffusers layout": nothing was written
        save_teacher(model, folder / f"{name}.safetensors", layout="flashvaed")
        return f"{name}.safetensors"


def _copy_folder(source: Path, into: Path) -> None:
    """Copy an export or engine folder (not a previous save's record and teacher: written anew)."""
    skip = {SAVED_FILE, "teacher", TEACHER_FILE}
    for entry in source.iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, into / entry.name)
        else:
            shutil.copy2(entry, into / entry.name)


def _offloading(hook: Any) -> Any:
    """The accelerate hook (of a chain) that keeps its layer's weights elsewhere between calls, if any."""
    if hook is None:
        return None
    if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
        return hook
    for h in getattr(hook, "hooks", ()):
        if _offloading(h) is not None:
            return _offloading(h)
    return None


def _manifest_config(family: str, recorded: Any, where: str) -> Any:
    """The teacher configuration an export's manifest records (``model.config``: the teacher's, or
    a student's config holding it as ``teacher``)."""
    if isinstance(recorded, dict) and isinstance(recorded.get("teacher"), dict):
        recorded = recorded["teacher"]
    try:
        return families.get(family).config_from_dict(recorded)
    except (ValueError, TypeError, CheckpointError) as e:
        raise InputError(f"{where}: its manifest's model.config is not a {family} configuration ({e})"[:300]) from None


def _noise_scales(decoder: engines.Decoder) -> tuple:
    """The noise maps a decoder injects (LTX-Video 0.9.1), for torch models and engines alike."""
    holder = decoder.model if isinstance(decoder, engines.TorchDecoder) else decoder.contract  # type: ignore[attr-defined]
    return tuple(holder.noise_scales)


def _global_rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_global_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _TypeNoticeFilter(logging.Filter):
    """Drops one diffusers log line: "Expected types for vae: (AutoencoderKLWan,), got FlashVAE", which
    ``DiffusionPipeline.from_pretrained(..., vae=FlashVAE)`` logs because it checks components against
    the ``__init__`` annotations (``isinstance``). FlashVAE stands in for those classes by design and
    checks the pairing itself (``FamilyMismatchError``); every other line passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for ") and message.endswith(f"got {FlashVAE!r}."))


logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_TypeNoticeFilter())
