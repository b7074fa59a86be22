"""`flashvaed` on the command line: a thin Typer shell over ``flashvaed.api``.

Bad input prints one line, ``error: ...``, and exits 2; no traceback. Set FLASHVAED_DEBUG=1 to
see the traceback of an unexpected failure. The library names parameters in its errors; here they
are written as the flags that set them. ``flashvaed.api`` (torch and the rest) is imported when a
command runs, so ``flashvaed --help`` stays instant.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from .allocator import tune_allocator
from .errors import FlashVAEDError


class _LazyModule:
    """A flashvaed module (``flashvaed.api``), imported on first use."""

    def __init__(self, name: str = "flashvaed.api") -> None:
        self._name = name

    def __getattr__(self, name: str) -> Any:
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, name)


api: Any = _LazyModule()
demos: Any = _LazyModule("flashvaed.demo")  # the demo runs api's commands: it is not one of them
benches: Any = _LazyModule("flashvaed.bench")
# parameters whose flag is not --NAME ("timestep": the stream option behind --decode-timestep)
FLAGS = {"out": "-o", "workspace_gib": "--workspace", "timestep": "--decode-timestep"}


def flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def shipped_presets() -> dict[str, list[str]]:
    """Family -> its shipped presets, read from the packaged preset files (``--help`` imports no
    torch, so not through the family registry). Every family ships presets, so its keys are the
    families too."""
    import yaml

    found: dict[str, list[str]] = {}
    for path in sorted(resources.files("flashvaed").joinpath("presets").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".yaml"):
            family = yaml.safe_load(path.read_text()).get("family") or "any"
            found.setdefault(family, []).append(path.name.removesuffix(".yaml"))
    return found


PRESETS = shipped_presets()


def examples(*lines: str) -> str:
    """A command's "Examples" epilog: real command lines, shown as written at the end of its
    ``--help`` (a trailing ``  # why`` comment is fine)."""
    return "\n".join(lines)


def _write_examples(epilog: str | None, formatter: Any) -> None:
    if epilog:  # as written: click would rewrap them into one paragraph
        with formatter.section("Examples"):
            for line in epilog.splitlines():
                formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


class Command(TyperCommand):
    """A command whose ``--help`` names every value in capitals, without type words: arguments by
    their metavar (``LATENTS``, ``MODEL...``), options by theirs (``--out PATH``) or their long name
    in capitals (``--device DEVICE``); its epilog is its examples."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            flag_like = getattr(param, "is_flag", False) or getattr(param, "count", False)
            if param.metavar is None and param.name and not flag_like:  # --compile MODE's name: COMPILE
                longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
                param.metavar = (longs[0][2:] if longs else param.name).upper().replace("_", "-")

    @staticmethod
    def _argument_name(param: Any) -> str:
        return param.metavar + ("..." if param.nargs != 1 else "")

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar if param.required else f"[{param.metavar}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((self._argument_name(param), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        _write_examples(self.epilog, formatter)


class Group(TyperGroup):
    """The ``flashvaed`` group: its epilog is examples too."""

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        _write_examples(self.epilog, formatter)


app = typer.Typer(
    name="flashvaed",
    help="Fast, exact streaming video VAE decoders (Flash-VAED). MODEL is a path to a VAE of any "
    "supported family (" + ", ".join(PRESETS) + "): an original release file (Wan2.1_VAE.pth, "
    "Wan2.2_VAE.pth, ltx-video-*.safetensors), a diffusers directory (AutoencoderKLWan, "
    "AutoencoderKLLTXVideo, AutoencoderKLMochi), a .safetensors file, a student "
    "directory, a released Flash-VAED student (Flash_VAED_Wan.pth, Flash_VAED_LTX.pth), or (for decode "
    "and info) an export or engine directory.",
    epilog=examples(
        "flashvaed demo",
        "flashvaed info Wan2.1_VAE.pth",
        "flashvaed decode latents.pt -m student/ -o video.mp4",
    ),
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"flashvaed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {message}\n"
out_console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def command(fn: F | None = None, *, examples: Sequence[str] = ()) -> Any:
    """Register ``fn`` (``@command`` or ``@command(examples=[...])``: the command lines its
    ``--help`` ends with) and turn its failures into one line and an exit code."""
    if fn is None:
        return functools.partial(command, examples=examples)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FlashVAEDError as e:
            raise fail(e.render(flag), e.exit_code) from None
        except KeyboardInterrupt as e:
            raise fail("interrupted", 143 if isinstance(e, Terminated) else 130) from None
        except BrokenPipeError:  # output piped into e.g. `head`: main() ends quietly
            raise
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("FLASHVAED_DEBUG"):
                raise
            raise fail(f"internal error: {type(e).__name__}: {e} (FLASHVAED_DEBUG=1 shows the traceback)", 1) from None

    app.command(cls=Command, epilog="\n".join(examples) or None)(run)
    return fn


Model = Annotated[Path, typer.Option("--model", "-m", metavar="MODEL", help="Model path (see `flashvaed --help`).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress on stderr (a bar on a terminal, a line every few seconds in a log)."
    ),
]


@command(
    examples=[
        "flashvaed info Wan2.1_VAE.pth",
        "flashvaed info student/ --height 720 --width 1280",
        "flashvaed info engine/ --json",
    ]
)
def info(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Model path.")],
    height: Annotated[
        int | None,
        typer.Option(metavar="PIXELS", help="Frame height in pixels for MACs and state size (default: the family's)."),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(
            metavar="PIXELS",
            help="Frame width in pixels (default: the family's, e.g. 480x832 for Wan2.1; docs/cli.md lists them).",
        ),
    ] = None,
    chunk: Annotated[int, typer.Option(metavar="N", help="Latent frames per steady chunk.")] = 1,
    dtype: Dtype = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Family, configuration, parameters, MACs per latent chunk and state size per stream."""
    if api.is_manifest_dir(model):
        print_engine_info(model, api.engine_info(model), as_json)
        return
    s = api.info(model, height=height, width=width, chunk=chunk, dtype=dtype)
    if as_json:
        out_console.print_json(json.dumps(s.to_dict()))
        return
    head = Table(title=f"{model}", show_header=False)
    head.add_row("family", f"{s.family} ({s.kind})")
    if s.kind == "student":
        layout = s.config["layout"]
        named = {"middle": layout["middle"], **{f"up.{i}": st for i, st in enumerate(layout["up"])}}
        upsample = {n: st.resample for n, st in zip((c.name for c in s.stages), s.stages, strict=True)}
        parts = [
            f"{name} {st['op']} {st['width']}ch" + (f" ({upsample[name]} upsample)" if upsample[name] != "conv" else "")
            for name, st in named.items()
        ]
        head.add_row("student", f"{s.config['name']}: {', '.join(parts)}, head {layout['head_op']}")
        shown = {k: v for k, v in s.config["teacher"].items() if v is not None and not k.startswith("latents_")}
        head.add_row("teacher config", ", ".join(f"{k}={v}" for k, v in shown.items()))
    else:
        shown = {k: v for k, v in s.config.items() if v is not None and not k.startswith("latents_")}
        head.add_row("config", ", ".join(f"{k}={v}" for k, v in shown.items()))
    head.add_row("parameters", f"{s.params_decoder / 1e6:.2f} M decoder, {s.params_total / 1e6:.2f} M total")
    if s.latency:
        head.add_row(
            "latency",
            f"{s.latency} latent frames (not causal: frames leave a stream {s.latency} latent frames late; "
            "closing the stream flushes them)",
        )
    else:
        head.add_row("first chunk", f"1 latent frame -> 1 frame: {s.macs_first / 1e9:.1f} GMACs")
    head.add_row(
        "steady chunk",
        f"{s.chunk} latent frame(s) -> {s.frames_per_chunk} frames: {s.macs_steady / 1e9:.1f} GMACs "
        f"({s.macs_per_frame / 1e9:.1f} GMACs per frame)",
    )
    head.add_row("state per stream", f"{s.state_tensors} tensors, {s.state_bytes / 2**20:.1f} MiB ({s.dtype})")
    wide = f"; {len(s.frame_wide)} frame-wide modules share their context across tiles" if s.frame_wide else ""
    if s.halo is not None:
        head.add_row(
            "tiling halo",
            f"{s.halo[0]}x{s.halo[1]} latent pixels (a --tile must exceed {2 * s.halo[0]}x{2 * s.halo[1]}){wide}",
        )
    stages = Table(title=f"per stage at {s.height}x{s.width}, steady chunk")
    t = s.teacher
    columns = ["stage", "op", "params M", "GMACs", "share", "state MiB"]
    if t is not None:
        columns += ["teacher params M", "teacher GMACs", "fewer MACs"]
        head.add_row(
            "teacher",
            f"{t.params_decoder / 1e6:.2f} M decoder params, {t.macs_per_frame / 1e9:.1f} GMACs "
            f"per frame, state {t.state_bytes / 2**20:.1f} MiB",
        )
        head.add_row("speed-up (MACs)", f"{t.macs_steady / max(s.macs_steady, 1):.1f}x fewer MACs than the teacher")
    for col in columns:
        stages.add_column(col, justify="left" if col in ("stage", "op") else "right")
    for i, st in enumerate(s.stages):
        row = [
            st.name,
            st.op,
            f"{st.params / 1e6:.3f}",
            f"{st.macs / 1e9:.1f}",
            f"{100 * st.macs / max(s.macs_steady, 1):.1f}%",
            f"{st.state_bytes / 2**20:.1f}",
        ]
        if t is not None:
            ts = t.stages[i]
            row += [f"{ts.params / 1e6:.3f}", f"{ts.macs / 1e9:.1f}", f"{ts.macs / max(st.macs, 1):.1f}x"]
        stages.add_row(*row)
    out_console.print(head)
    out_console.print(stages)


def print_engine_info(path: Path, d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out_console.print_json(json.dumps(d))
        return
    m, shapes = d["model"], d["shapes"]
    table = Table(title=str(path), show_header=False)
    kind = "engine" if d["format"] == "flashvaed-engine" else "export"
    backend = d.get("backend") or {}
    table.add_row(
        "kind",
        f"{kind}" + (f" ({backend['name']}, {', '.join(backend.get('providers', []))})" if backend else " (ONNX)"),
    )
    table.add_row("model", f"{m['family']} {m['kind']} {m['fingerprint']} from {m['source']}")
    table.add_row("precision", f"{d['precision']}, plugins {d['plugins']}, opset {d['opset']}")
    s = m["spatial_factor"]
    for name in ("batch", "chunk", "height", "width"):
        r = shapes[name]
        px = f"  ({r['min'] * s}..{r['max'] * s} px)" if name in ("height", "width") else ""
        table.add_row(name, f"min {r['min']}, opt {r['opt']}, max {r['max']}{px}")
    table.add_row(
        "state per stream", f"{len(d['state'])} tensors, {d['state_bytes_at_opt'] / 2**20:.1f} MiB at opt shapes"
    )
    for graph, size in d["file_bytes"].items():
        table.add_row(f"{graph} graph", f"{d['graphs'][graph]['file']} ({size / 2**20:.1f} MiB)")
    out_console.print(table)


@command(
    examples=[
        "flashvaed decode latents.pt -m Wan2.1_VAE.pth -o video.mp4",
        "flashvaed decode latents.pt -m student/ -o frames/ --chunk 4",
        "flashvaed decode latents.pt -m Wan2.1_VAE.pth -o frames.pt --max-memory 8GB",
    ]
)
def decode(
    latents: Annotated[
        Path,
        typer.Argument(
            metavar="LATENTS",
            help="Normalised latents (B,z,T,h,w): .pt (tensor or dict key 'latents'), .npy or .safetensors.",
        ),
    ],
    model: Model,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="Output: .pt/.npy/.safetensors (raw float32 "
            "frames in [-1,1], key 'frames'), .mp4, or a directory of PNGs.",
        ),
    ],
    chunk: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Latent frames per streaming step after the first (default: the engine's optimum, 2 for torch).",
        ),
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_index: Annotated[int, typer.Option(metavar="N", help="Which sample goes to .mp4/PNG outputs.")] = 0,
    fps: Annotated[int, typer.Option(metavar="N", help="Frame rate of .mp4 outputs.")] = 16,
    decode_timestep: Annotated[
        float | None,
        typer.Option(
            metavar="T", help="Timestep-conditioned models (LTX-Video 0.9.1+): the decoder's timestep (default 0.05)."
        ),
    ] = None,
    decode_noise_scale: Annotated[
        float | None,
        typer.Option(
            metavar="S",
            help="Timestep-conditioned models: noise mixed into the normalised latents, "
            "latents*(1-S) + noise*S, as upstream's pipeline does (default 0.025; 0 for none).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(metavar="N", help="Seed of every random draw (decode noise, LTX 0.9.1's injected noise).")
    ] = 0,
    tile: Annotated[
        str | None,
        typer.Option(
            metavar="HxW",
            help="Exact spatial tiling: HxW latent pixels each tile decodes, its halo included (e.g. 64x64; "
            "a tile must exceed twice the model's halo, which `info` shows). Frames equal untiled decoding.",
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE",
            help="Exact spatial tiling with the largest tile whose decode fits SIZE (e.g. 8GB, 6GiB; torch models).",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="MODE",
            help="'spatial': under torchrun, split every frame across the ranks (exact; rank 0 writes the output).",
        ),
    ] = None,
    compile: Annotated[
        str | None,
        typer.Option(
            "--compile",
            metavar="MODE",
            help="Torch models: run the steady streaming steps compiled. none: eager; inductor: torch.compile, "
            "static shapes (CPU, CUDA); cudagraphs: CUDA graph of the eager step (CUDA); max: inductor in a CUDA "
            "graph (CUDA); auto: cudagraphs on CUDA, eager elsewhere. The compile is paid once per shape "
            "(inductor: tens of seconds to minutes on a CPU; see docs/runtimes.md).",
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Decode latents to frames, streaming chunk by chunk (memory stays flat in the clip length;
    --tile or --max-memory bound it in the frame size too, exactly)."""
    r = api.decode(
        latents,
        model,
        out,
        chunk=chunk,
        device=device,
        dtype=dtype,
        batch_index=batch_index,
        fps=fps,
        decode_timestep=decode_timestep,
        decode_noise_scale=decode_noise_scale,
        seed=seed,
        tile=tile,
        max_memory=max_memory,
        shard=shard,
        progress=not quiet,
        compile=compile,
    )
    if not r.written:  # another rank of a sharded decode: rank 0 wrote the output and says so
        return
    b, _, f, h, w = r.shape
    typer.echo(
        f"decoded {b}x{f} frames {h}x{w} in {r.seconds:.2f} s ({r.frames_per_second:.1f} frames/s) -> {r.output}"
    )


@command(
    examples=[
        "flashvaed encode clip.mp4 -m Wan2.1_VAE.pth -o latents.pt",
        "flashvaed encode clip.mp4 -m Wan2.1_VAE.pth -o latents.pt --height 480 --width 832 --max-frames 81",
    ]
)
def encode(
    video: Annotated[
        Path,
        typer.Argument(
            metavar="VIDEO",
            help="A video (.mp4/.webm/.mov/.gif/...) or raw frames (B,3,F,H,W) in [-1,1] as .pt/.npy/.safetensors.",
        ),
    ],
    model: Model,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="FILE", help="Latents file: .pt (key 'latents'), .npy or .safetensors."),
    ],
    height: Annotated[
        int | None, typer.Option(metavar="PIXELS", help="Target height (scale to cover, centre crop).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(metavar="PIXELS", help="Target width (scale to cover, centre crop).")
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="Without a target size: 'crop' or 'resize' to multiples of the model's spatial factor "
            "(8 for Wan2.1 and Mochi, 16 for Wan2.2, 32 for LTX-Video).",
        ),
    ] = "crop",
    frames: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="'trim' trailing frames or 'pad' the last to reach tn+1 (t: 4 for Wan, 8 for LTX-Video, 6 for Mochi).",
        ),
    ] = "trim",
    max_frames: Annotated[int | None, typer.Option(metavar="N", help="Read at most this many frames.")] = None,
    stride: Annotated[int, typer.Option(metavar="N", help="Keep every n-th frame (frame-rate subsampling).")] = 1,
    device: Device = "auto",
    dtype: Dtype = "float32",
    quiet: Quiet = False,
) -> None:
    """Encode a video to normalised diffusion-space latents with the model's encoder."""
    options = api.VideoOptions(
        height=height,
        width=width,
        fit=fit,
        frames=frames,  # type: ignore[arg-type]
        max_frames=max_frames,
        stride=stride,
    )
    r = api.encode(video, model, out, options=options, device=device, dtype=dtype, progress=not quiet)
    typer.echo(f"encoded video {r.video_shape} -> latents {r.latents_shape} in {r.seconds:.2f} s -> {r.output}")


@command(
    examples=[
        "flashvaed convert Flash_VAED_Wan.pth -o flash-wan/",
        "flashvaed convert Flash_VAED_LTX.pth -o flash-ltx/",
    ]
)
def convert(
    model: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL",
            help="A student: a released file (Flash_VAED_Wan.pth, Flash_VAED_LTX.pth) or a student directory.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="The student directory to write (replaced only if ours).")
    ],
) -> None:
    """Write a student (a released Flash-VAED file included) as a flashvaed student directory.

    The directory (config.json + model.safetensors) decodes identically; version it, distil it
    further (`flashvaed distill -s DIR`), export it, share it.
    """
    r = api.convert(model, out)
    carries = ", with its teacher's encoder" if r.encoder else ""
    typer.echo(f"{r.name} ({r.family} student, {r.params / 1e6:.2f} M decoder parameters{carries}) -> {r.output}")


@command(
    examples=[
        "flashvaed prune -t Wan2.1_VAE.pth --preset flash-wan2.1 -o student/",
        "flashvaed prune -t Wan2.1_VAE.pth --preset flash-wan2.1 --calib latents/ -o student/",
        "flashvaed prune -t Wan2.1_VAE.pth --preset flash-wan2.1 --explain",
    ]
)
def prune(
    teacher: Annotated[
        Path, typer.Option("--teacher", "-t", metavar="TEACHER", help="Teacher checkpoint (any MODEL format).")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", metavar="DIR", help="Student directory to write.")] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Student preset: " + "; ".join(f"{', '.join(names)} ({fam})" for fam, names in PRESETS.items()) + ".",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Student config file (.yaml/.json) instead of a preset.")
    ] = None,
    calib: Annotated[
        str,
        typer.Option(
            metavar="SOURCE", help="Calibration data: a latents file or folder, a video file or folder, or 'synthetic'."
        ),
    ] = "synthetic",
    criterion: Annotated[
        str, typer.Option(help="'independence' (pivoted selection + compensation) or 'l1' (magnitude baseline).")
    ] = "independence",
    calib_clips: Annotated[int, typer.Option(metavar="N", help="Synthetic calibration clips.")] = 4,
    calib_frames: Annotated[
        int | None,
        typer.Option(metavar="N", help="Frames per synthetic or video calibration clip (tn+1; default: the family's)."),
    ] = None,
    calib_size: Annotated[
        int, typer.Option(metavar="PIXELS", help="Height = width of synthetic or video calibration clips.")
    ] = 64,
    chunk: Annotated[int, typer.Option(metavar="N", help="Latent frames per streaming step while calibrating.")] = 2,
    height: Annotated[
        int | None, typer.Option(metavar="PIXELS", help="Resolution for the report's MACs (default: the family's).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(metavar="PIXELS", help="Resolution for the report's MACs (default: the family's).")
    ] = None,
    device: Device = "auto",
    explain_only: Annotated[
        bool, typer.Option("--explain", help="Print the layout and channel groups, then stop.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Build a student from a teacher: operator substitution + independence-aware channel pruning."""
    if explain_only:
        plan = api.explain(teacher, preset=preset, config=config)
        for note in plan.notes:
            typer.echo(f"note: {note}")
        typer.echo(f"{len(plan.groups)} channel groups (kept / teacher channels):")
        for g in plan.groups:
            typer.echo(f"\n{g['name']}  [{g['kind']}]  {g['kept']} / {g['total']}")
            typer.echo(f"  produced by:   {', '.join(g['producers'])}")
            typer.echo(f"  consumed by:   {', '.join(g['consumers'])}")
            typer.echo(f"  normalised by: {', '.join(g['norms']) or '-'}")
            if g["read_by"]:
                typer.echo(f"  also read by:  {', '.join(g['read_by'])} (channels they need are kept)")
        return
    if out is None:
        raise FlashVAEDError("--out is required (the student directory to write)")
    report = api.prune(
        teacher,
        out,
        preset=preset,
        config=config,
        calib=calib,
        criterion=criterion,
        calib_clips=calib_clips,
        calib_frames=calib_frames,
        calib_size=calib_size,
        chunk=chunk,
        height=height,
        width=width,
        device=device,
        progress=not quiet,
    )
    for note in report["notes"]:
        typer.echo(f"note: {note}")
    totals, fid = report["totals"], report["fidelity_vs_teacher_psnr_db"]
    typer.echo(
        f"student {report['student']} ({report['criterion']}): {totals['student_params'] / 1e6:.2f} M params "
        f"(teacher {totals['teacher_params'] / 1e6:.2f} M), {totals['macs_ratio']:.1f}x fewer MACs at "
        f"{'x'.join(map(str, totals['resolution']))}; before distillation PSNR vs teacher {fid['student']:.2f} dB "
        f"(pruned only {fid['pruned']:.2f} dB) -> {out}"
    )


@command(
    examples=[
        "flashvaed distill -t Wan2.1_VAE.pth -s student/ -d videos/ -o run/",
        "flashvaed distill -t Wan2.1_VAE.pth -s student/ -d videos/ -d synthetic -o run/ --config distill.yaml",
        "flashvaed distill -t Wan2.1_VAE.pth -s student/ -d videos/ -o run/ --resume",
    ]
)
def distill(
    teacher: Annotated[
        Path, typer.Option("--teacher", "-t", metavar="TEACHER", help="Teacher checkpoint (any MODEL format).")
    ],
    student: Annotated[
        Path, typer.Option("--student", "-s", metavar="DIR", help="Student directory from `flashvaed prune`.")
    ],
    data: Annotated[
        list[str],
        typer.Option(
            "--data", "-d", metavar="SOURCE", help="Videos, latents, folders of them, or 'synthetic'; repeat to mix."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="DIR",
            help="Run directory: becomes the trained student (EMA weights) with checkpoint, logs and report.",
        ),
    ],
    config: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Distillation config (.yaml/.json); see docs/distill.md.")
    ] = None,
    steps_per_phase: Annotated[
        int | None, typer.Option(metavar="N", help="Override the length of all three phases.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    cache_latents: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Encode each training clip once and keep it here.")
    ] = None,
    eval_clips: Annotated[
        int, typer.Option(metavar="N", help="Held-out clips for the PSNR reported at each phase end.")
    ] = 2,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Three-phase distillation: stage-wise alignment, end-to-end transfer, fidelity refinement."""
    report = api.distill(
        teacher,
        student,
        data,
        out,
        config=config,
        steps_per_phase=steps_per_phase,
        resume=resume,
        cache_latents=cache_latents,
        eval_clips=eval_clips,
        device=device,
        progress=not quiet,
    )
    if report["skipped_videos"]:
        typer.echo(f"skipped {len(report['skipped_videos'])} unreadable videos (see warnings)", err=True)
    parts = [f"{p['name']} {p['psnr_vs_teacher_db']:.2f} dB" for p in report["phases"] if p["psnr_vs_teacher_db"]]
    typer.echo(
        f"distilled -> {out}: held-out PSNR vs teacher {report['psnr_vs_teacher_before_db']:.2f} dB before, "
        + ", ".join(parts)
        + f"; {report['steps_per_second']:.2f} steps/s"
    )


@command(
    examples=[
        "flashvaed evaluate -m run/ -t Wan2.1_VAE.pth -d videos/",
        "flashvaed evaluate -m run/ -t Wan2.1_VAE.pth -d synthetic --clips 8 --json eval.json",
    ]
)
def evaluate(
    model: Annotated[
        Path, typer.Option("--model", "-m", metavar="STUDENT", help="Student directory (or run directory).")
    ],
    teacher: Annotated[Path, typer.Option("--teacher", "-t", metavar="TEACHER", help="Its teacher.")],
    data: Annotated[
        list[str], typer.Option("--data", "-d", metavar="SOURCE", help="Videos, latents, folders, or 'synthetic'.")
    ],
    clips: Annotated[int, typer.Option(metavar="N", help="Clips to evaluate.")] = 4,
    frames: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Frames per clip, tn+1 (t: 4 for Wan, 8 for LTX-Video, 6 for Mochi; default: the fewest from "
            "17 on, 17 for Wan and LTX-Video, 19 for Mochi).",
        ),
    ] = None,
    size: Annotated[
        int,
        typer.Option(
            metavar="PIXELS",
            help="Clip height = width (a multiple of the spatial factor: 8 for Wan2.1 and Mochi, 16 for Wan2.2, "
            "32 for LTX-Video).",
        ),
    ] = 128,
    chunk: Annotated[int, typer.Option(metavar="N", help="Latent frames per streaming step.")] = 1,
    out_json: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Also write the metrics as JSON here.")
    ] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """PSNR/SSIM vs ground truth and vs the teacher, retention, flicker, decode speed of both."""
    result = api.evaluate(
        model,
        teacher,
        data,
        clips=clips,
        frames=frames,
        size=size,
        chunk=chunk,
        device=device,
        out_json=out_json,
        progress=not quiet,
    )
    typer.echo(result.markdown())


@command(
    examples=[
        "flashvaed export student/ -o export/",
        "flashvaed export student/ -o export-fp16/ --precision fp16 --height 480 --width 832 --chunk 2",
        "flashvaed export Wan2.1_VAE.pth -o export/ --tiling",
    ]
)
def export(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Teacher checkpoint or student directory.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="DIR", help="Export directory: first.onnx, steady.onnx, manifest.json."),
    ],
    chunk: Annotated[
        str,
        typer.Option(
            metavar="RANGE", help="Latent frames per steady chunk: K (static), MIN:MAX or MIN:OPT:MAX (dynamic)."
        ),
    ] = "1:2:8",
    height: Annotated[
        str,
        typer.Option(
            metavar="RANGE", help="Frame height in pixels (multiple of the spatial factor): N, MIN:MAX or MIN:OPT:MAX."
        ),
    ] = ("64:256:1280"),
    width: Annotated[
        str,
        typer.Option(
            metavar="RANGE", help="Frame width in pixels (multiple of the spatial factor): N, MIN:MAX or MIN:OPT:MAX."
        ),
    ] = ("64:256:1280"),
    batch: Annotated[
        str, typer.Option(metavar="RANGE", help="Streams batched per call: N, MIN:MAX or MIN:OPT:MAX.")
    ] = "1:1:4",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or bf16 (weights and state; I/O stays float32).")] = "fp32",
    plugins: Annotated[
        str,
        typer.Option(
            help="Which streaming causal convs become plugin nodes (with function bodies): 'all', "
            "'depthwise' (dense ones plain ops) or 'none' (plain ops); 'flashvaed' means 'all'."
        ),
    ] = "all",
    opset: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="ONNX opset, 18 up to what torch and onnx here can write (default: the lowest that "
            "supports --precision: 18, 22 for bf16).",
        ),
    ] = None,
    tiling: Annotated[
        bool,
        typer.Option(
            "--tiling",
            help="Also write the graphs that let an engine decode frames larger than --height/--width in exact "
            "tiles when the decoder mixes whole frames (Wan's attention, Mochi's group norms); others tile anyway.",
        ),
    ] = False,
    tiling_frame: Annotated[
        str, typer.Option(metavar="HxW", help="With --tiling: the largest whole frame (HxW pixels) a tiled run takes.")
    ] = "1088x1920",
    windows: Annotated[
        bool,
        typer.Option(
            help="Decoders with latency (LTX): each layer of a step computes only the clip's positions, sized "
            "from the clock inputs (warm-up and flush cost what they compute). --no-windows keeps every shape "
            "inside the graphs static, computing whole steps (for static-shape builders such as TensorRT)."
        ),
    ] = True,
    quiet: Quiet = False,
) -> None:
    """Export a teacher or student to two streaming ONNX graphs (first, steady) and their I/O contract."""
    r = api.export(
        model,
        out,
        chunk=chunk,
        height=height,
        width=width,
        batch=batch,
        precision=precision,
        plugins=plugins,
        opset=opset,
        tiling=tiling,
        tiling_frame=tiling_frame,
        windows=windows,
        progress=not quiet,
    )
    for problem in r.tensorrt_unsupported:
        typer.echo(f"warning: TensorRT's ONNX parser cannot take {problem}", err=True)
    c = r.contract
    typer.echo(
        f"exported {c.model['family']} {c.model['kind']} ({c.precision}, opset {c.opset}, plugins {c.plugins}, "
        f"{len(c.state)} state tensors; chunk {c.shapes['chunk'].describe()}, "
        f"latent {c.shapes['height'].describe()} x {c.shapes['width'].describe()}) -> {r.out_dir}"
    )


@command(
    examples=[
        "flashvaed build-engine export/ -o engine/",
        "flashvaed build-engine export/ -o engine/ --provider CPUExecutionProvider --threads 8",
        "flashvaed build-engine export/ -o engine-trt/ --backend tensorrt --timing-cache trt.cache",
    ]
)
def build_engine(
    export_dir: Annotated[Path, typer.Argument(metavar="EXPORT", help="Export directory from `flashvaed export`.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Engine directory to write.")],
    backend: Annotated[str, typer.Option(help="tensorrt or onnxruntime.")] = "onnxruntime",
    provider: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="ONNX Runtime execution provider, in order (repeat); default CUDA if present, then CPU.",
        ),
    ] = None,
    threads: Annotated[int, typer.Option(metavar="N", help="ONNX Runtime intra-op threads (0 = all cores).")] = 0,
    timing_cache: Annotated[
        Path | None, typer.Option(metavar="FILE", help="TensorRT timing cache file (read and updated).")
    ] = None,
    workspace: Annotated[float, typer.Option(metavar="GIB", help="TensorRT builder workspace in GiB.")] = 4.0,
    quiet: Quiet = False,
) -> None:
    """Build a TensorRT or ONNX Runtime engine directory from an export."""
    c = api.build_engine(
        export_dir,
        out,
        backend=backend,
        providers=provider,
        threads=threads,
        timing_cache=timing_cache,
        workspace_gib=workspace,
        progress=not quiet,
    )
    providers = c.backend.get("providers", []) or []
    typer.echo(f"built {backend} engine ({c.precision}, {', '.join(providers)}) -> {out}")
    dynamic = [k for k in ("chunk", "height", "width") if not c.shapes[k].static]
    if backend == "onnxruntime" and providers[:1] == ["CPUExecutionProvider"] and dynamic:
        typer.echo(
            f"note: {', '.join(dynamic)} dynamic: on a CPU an export of one --chunk, --height and --width runs "
            "faster (its temporal convs are rewritten too; docs/runtimes.md)",
            err=True,
        )


@command(
    examples=[
        "flashvaed validate engine/ -r student/ -l latents.pt",
        "flashvaed validate engine/ -r student/ -l latents.pt -t Wan2.1_VAE.pth --json report.json",
    ]
)
def validate(
    engine: Annotated[Path, typer.Argument(metavar="ENGINE", help="Engine or export directory.")],
    reference: Annotated[
        Path, typer.Option("--reference", "-r", metavar="MODEL", help="The PyTorch model it was exported from.")
    ],
    latents: Annotated[
        Path, typer.Option("--latents", "-l", metavar="LATENTS", help="Latents to decode (.pt/.npy/.safetensors).")
    ],
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher", "-t", metavar="TEACHER", help="Teacher for PSNR/SSIM (default: the reference if a teacher)."
        ),
    ] = None,
    chunk: Annotated[
        int | None, typer.Option(metavar="N", help="Latent frames per steady chunk (default: the engine's optimum).")
    ] = None,
    out_json: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Write the full report here.")] = None,
) -> None:
    """Compare an engine with its PyTorch model on every chunk (polygraphy); exit 1 if tolerances fail."""
    r = api.validate(engine, reference, latents, teacher=teacher, chunk=chunk, out_json=out_json)
    worst = max((o["max_abs"] for c in r.chunks for o in c["outputs"].values()), default=0.0)
    failed = [c for c in r.chunks if not c["passed"]]
    line = (
        f"{'PASSED' if r.passed else 'FAILED'}: {len(r.chunks)} chunks, {len(failed)} failed, worst max abs error "
        f"{worst:.2e} (atol {r.tolerances['atol']:g}, {r.precision}); whole clip vs reference "
        f"{r.end_to_end['psnr']:.1f} dB"
    )
    if r.teacher is not None:
        line += f"; vs teacher PSNR {r.teacher['psnr']:.2f} dB, SSIM {r.teacher['ssim']:.4f}"
    tiled = r.tiled or {}
    if "max_abs" in tiled:
        region = "x".join(map(str, tiled["region"]))
        line += f"; tiled ({tiled['tiles']} tiles of {region} latent) max abs error {tiled['max_abs']:.2e}"
    elif "skipped" in tiled:
        line += f"; tiled decode not checked: {tiled['skipped']}"
    typer.echo(line)
    if not r.passed:
        raise typer.Exit(1)


@command(
    examples=[
        "flashvaed bench --smoke",
        "flashvaed bench flash-wan2.1 --teacher wan2.1 --frames 9 --device cpu",
        "flashvaed bench student/ --runtime onnxruntime --height 480 --width 832 --json bench.json",
    ]
)
def bench(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODEL",
            help="Models to time: a path (checkpoint, student, export or engine directory), a family name "
            "(" + ", ".join(PRESETS) + ": its released configuration, random weights) or a preset "
            "(e.g. flash-wan2.1: built on the family's released teacher, or on --teacher).",
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            "-t",
            metavar="TEACHER",
            help="The teacher speed-ups are computed against (a family name or a teacher path; default: the "
            "one each model identifies).",
        ),
    ] = None,
    runtime: Annotated[
        str, typer.Option(help="torch (eager), compiled, onnxruntime (a static export at the bench size) or tensorrt.")
    ] = "torch",
    compile_mode: Annotated[
        str,
        typer.Option(
            "--compile", metavar="MODE", help="With --runtime compiled: the compile mode (engines.load's compile=)."
        ),
    ] = "auto",
    frames_on: Annotated[
        str,
        typer.Option(
            "--frames-on",
            metavar="WHERE",
            help="torch and compiled runtimes: hand frames back on the cpu (every engine's contract) or keep them "
            "on the device (what FlashVAE does in a GPU pipeline: no host copy per step).",
        ),
    ] = "cpu",
    height: Annotated[int | None, typer.Option(metavar="PIXELS", help="Frame height in pixels (default 256).")] = None,
    width: Annotated[int | None, typer.Option(metavar="PIXELS", help="Frame width in pixels (default 256).")] = None,
    frames: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Output frames of the clip, 1 + t*n (default: the first frame + two steady chunks)."
        ),
    ] = None,
    chunk: Annotated[int, typer.Option(metavar="N", help="Latent frames per steady streaming step.")] = 2,
    device: Device = "auto",
    dtype: Dtype = "float32",
    repeats: Annotated[
        int, typer.Option(metavar="N", help="Timed whole-clip decodes per model, interleaved (median).")
    ] = 3,
    warmup: Annotated[int, typer.Option(metavar="N", help="Untimed decodes per model first.")] = 1,
    diffusers: Annotated[
        bool, typer.Option("--diffusers/--no-diffusers", help="Also time diffusers' own VAE class for the family.")
    ] = True,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="The embedded tiny teachers and their flash students, tiny, in seconds.")
    ] = False,
    out_json: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Also write the report as JSON here.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Decode speed on this machine: each model vs its teacher on the same runtime and vs diffusers'
    VAE (warm-up, interleaved repeats, medians; docs/cli.md explains the columns)."""
    report = benches.bench(
        list(models or []),
        teacher=teacher,
        runtime=runtime,
        height=height,
        width=width,
        frames=frames,
        chunk=chunk,
        device=device,
        dtype=dtype,
        repeats=repeats,
        warmup=warmup,
        compare_diffusers=diffusers,
        compile_mode=compile_mode,
        frames_on=frames_on,
        smoke=smoke,
        json_path=out_json,
        progress=not quiet,
    )
    st = report.settings
    columns, cells = report.table()
    table = Table(
        title=f"{st['height']}x{st['width']}, {report.rows[0].frames} frames ({report.rows[0].latent_frames} latent), "
        f"chunk {st['chunk']}, {st['device']} {st['dtype']}, median of {st['repeats']}",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for row in cells:
        table.add_row(*row)
    # piped or redirected (no terminal to fit): the table whole, not squeezed into 80 columns
    out_console.print(table, width=None if out_console.is_terminal else 200)
    typer.echo(f"peak MiB: {report.memory_label()}; speed-ups: whole-clip frames/s ratios on the same device")
    for s in report.skipped:
        typer.echo(f"skipped {s['what']}: {s['reason']}")
    for note in report.notes:
        typer.echo(f"note: {note}")
    if out_json is not None:
        typer.echo(f"report -> {out_json}")


@command(
    examples=[
        "flashvaed demo --family ltx -o demo-ltx/",
        "flashvaed demo --model Wan2.1_VAE.pth --height 256 --width 256",
        "flashvaed demo --family wan2.2 --student flash-wan2.2-fast -o demo-fast/  # compare students",
    ]
)
def demo(
    family: Annotated[
        str, typer.Option(help="The family whose embedded teacher runs the chain: " + ", ".join(PRESETS) + ".")
    ] = "wan2.1",
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Directory for everything the demo writes.")
    ] = Path("demo-output"),
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", metavar="MODEL", help="Your own teacher instead of the embedded one."),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            metavar="PRESET",
            help="The student to prune and distil: a preset or a config file (default: the family's flash- preset).",
        ),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option(metavar="N", help="Frames of the generated clip (tn+1; default 4 latent frames' worth)."),
    ] = None,
    height: Annotated[
        int | None, typer.Option(metavar="PIXELS", help="Clip height (default: 128, or a 4-latent grid).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(metavar="PIXELS", help="Clip width (default: 128, or a 4-latent grid).")
    ] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the generated clip (and of LTX's decode noise).")] = 0,
    scene: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="The generated clip's scene: shapes, objects, pan, gradient, detail or text "
            "(default: the family's; docs/demo.md).",
        ),
    ] = None,
    chunk: Annotated[int, typer.Option(metavar="N", help="Latent frames per streaming step.")] = 1,
    distill_steps: Annotated[int, typer.Option(metavar="N", help="Distillation steps per phase.")] = 30,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """The whole toolkit on a clip it makes itself: teacher -> prune -> distil -> export -> ONNX
    Runtime engine -> validate -> decode; writes videos, a contact sheet and a report (docs/demo.md)."""
    r = demos.demo(
        out,
        family=family,
        model=model,
        student=student,
        frames=frames,
        height=height,
        width=width,
        seed=seed,
        scene=scene,
        chunk=chunk,
        distill_steps=distill_steps,
        device=device,
        progress=not quiet,
    )
    typer.echo(r.summary())


@command(
    examples=[
        "flashvaed sample-latents --pipeline wan-pipeline/ --prompts prompts.txt -o latents/",
        "flashvaed sample-latents --pipeline ltx-pipeline/ --prompts prompts.txt -o latents/ --steps 20 --frames 49",
        "flashvaed sample-latents --pipeline wan-pipeline/ --prompts more.txt -o latents-2/ --seed 1000  # new seeds",
    ]
)
def sample_latents(
    pipeline: Annotated[
        Path, typer.Option(metavar="DIR", help="A diffusers pipeline folder (model_index.json); nothing downloads.")
    ],
    prompts: Annotated[Path, typer.Option(metavar="FILE", help="Prompts, one per line (blank lines skipped).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Folder to write: NNNN.safetensors per prompt.")
    ],
    steps: Annotated[int, typer.Option(metavar="N", help="Denoising steps per prompt.")] = 30,
    height: Annotated[
        int | None, typer.Option(metavar="PIXELS", help="Video height (default: the pipeline's).")
    ] = None,
    width: Annotated[int | None, typer.Option(metavar="PIXELS", help="Video width (default: the pipeline's).")] = None,
    frames: Annotated[int | None, typer.Option(metavar="N", help="Video frames (default: the pipeline's).")] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the first prompt; the i-th takes N + i.")] = 0,
    guidance_scale: Annotated[
        float | None, typer.Option("--guidance", metavar="SCALE", help="Guidance scale (default: the pipeline's).")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    quiet: Quiet = False,
) -> None:
    """Sample diffusion latents with a pipeline, one file per prompt: the best calibration data for
    `prune --calib` and training data for `distill -d` (normalised latents, (1, z, T, h, w))."""
    from .sample_latents import sample_latents as sample

    files = sample(
        pipeline,
        prompts,
        out,
        steps=steps,
        height=height,
        width=width,
        frames=frames,
        seed=seed,
        guidance_scale=guidance_scale,
        device=device,
        dtype=dtype,
        progress=not quiet,
    )
    typer.echo(f"wrote {len(files)} latents files and prompts.json to {out}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that outputs in progress are cleaned up as on Ctrl-C."""


def _terminate(signum: int, _frame: Any) -> None:
    raise Terminated()


def _usage_errors() -> tuple[type[Exception], ...]:
    """Typer's usage errors: click's, or those of the click that newer Typer versions vendor."""
    kinds: list[type[Exception]] = []
    vendored = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    if vendored is not None:
        kinds.append(vendored)
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def main() -> None:
    """The console script: SIGTERM handled like Ctrl-C; usage errors in one line, exit 2."""
    signal.signal(signal.SIGTERM, _terminate)
    tune_allocator()  # our own process: freed activation buffers are reused (flashvaed/allocator.py)
    try:
        code = app(standalone_mode=False)
    except _usage_errors() as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `flashvaed` or `flashvaed CMD`: the help
            out_console.print(e.format_message(), markup=False, highlight=False)  # type: ignore[attr-defined]
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        err_console.print(f"error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2) or 2)
    except (typer.Abort, KeyboardInterrupt) as e:  # Ctrl-C outside a command, e.g. while importing
        err_console.print("error: interrupted", markup=False, highlight=False)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except BrokenPipeError:  # e.g. `flashvaed info ... | head`
        sys.stderr.close()
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
