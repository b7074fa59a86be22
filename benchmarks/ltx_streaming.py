"""LTX-Video: streaming memory stays flat in clip length; the decoder's latency; flash-ltx's speed.

Part 1 (memory): an LTX decoder (random weights, the released block structure at a reduced width
by default) decodes clips of 5 and 21 latent frames, streamed in chunks (frames handed on and
dropped, as ``flashvaed decode`` does) and in one shot (upstream's whole-clip decode). Each run is
a fresh subprocess; the number is its peak resident memory above the model and latents.

Part 2 (speed, ``--speed``): the released decoder of one generation and flash-ltx built on it at
512x768, steady streaming chunks timed in the same run (per output frame), with MACs from the
meta-device count. A stream's warm-up and its flush cost the same per position as a steady step.

Part 3 (``--flush``): what a short clip's stream costs against its one-shot decode, on torch and on
the ONNX Runtime engine in the same run: torch streams (``model.decode``, chunks of ``--chunk``)
vs ``model.decode_clip`` (upstream's whole-clip pass); the engine (a static export for this size
and chunk) vs a one-shot graph of the same model (the whole clip in one ONNX Runtime run). Layers
compute only the positions holding frames of the clip (their windows; an idle layer's convs are
skipped inside the graphs), so warm-up and flush steps cost what they compute, and the engine runs
the final chunk and the whole latency in one ``flush`` graph run.

    python benchmarks/ltx_streaming.py                        # memory, 5 vs 21 latent frames
    python benchmarks/ltx_streaming.py --speed --generation 0.9.1
    python benchmarks/ltx_streaming.py --flush --frames 5     # stream vs one-shot, torch and ONNX Runtime
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from flashvaed.models import StudentSpec, summarize
from flashvaed.models.families.ltx import LTXVAE, LTXConfig
from flashvaed.models.student import build_student


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_run(args: argparse.Namespace) -> None:
    """In a subprocess: one decode, printing JSON with its peak memory above the baseline."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LTXConfig.released(args.generation, decoder_base=args.decoder_base, encoder_base=8)
    model = LTXVAE(config).eval()
    s = model.spatial_factor
    latents = torch.randn(1, model.latent_channels, args.run_frames, args.height // s, args.width // s)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    frames = 0
    with torch.inference_mode():
        if args.mode == "stream":
            stream = model.stream()
            for i in range(0, latents.shape[2], args.chunk):
                frames += stream.push(latents[:, :, i : i + args.chunk]).shape[2]
            frames += stream.close().shape[2]
        else:
            frames = model.decode_clip(latents).shape[2]
    print(
        json.dumps(
            {
                "peak_mib": peak_rss_mib() - baseline,
                "seconds": time.perf_counter() - start,
                "frames": frames,
                "latency": model.latency,
            }
        )
    )


def memory(args: argparse.Namespace) -> None:
    print(
        f"LTX-Video {args.generation} decoder (decoder_base {args.decoder_base}, random weights), "
        f"{args.height}x{args.width}, chunk {args.chunk}, CPU; peak RSS above model + latents, fresh process per run"
    )
    print("\n| latent frames | frames | mode | peak MiB | seconds |")
    print("|---|---|---|---|---|")
    for n in args.frames:
        for mode in ("stream", "one-shot"):
            cmd = [sys.executable, __file__, "--_run", mode, "--_frames", str(n)]
            cmd += ["--generation", args.generation, "--decoder-base", str(args.decoder_base)]
            cmd += ["--height", str(args.height), "--width", str(args.width), "--chunk", str(args.chunk)]
            out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(f"| {n} | {out['frames']} | {mode} | {out['peak_mib']:.0f} | {out['seconds']:.1f} |")
    print(f"\nlatency of this decoder: {out['latency']} latent frames")


@torch.inference_mode()
def steady_seconds_per_frame(model: torch.nn.Module, latents: torch.Tensor, chunk: int, repeats: int) -> float:
    stream = model.stream()
    stream.push(latents[:, :, :1])
    stream.push(latents[:, :, 1 : 1 + chunk])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        stream.push(latents[:, :, 1 : 1 + chunk])
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) / (model.temporal_factor * chunk)


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    config = LTXConfig.released(args.generation)
    models = {"teacher": LTXVAE(config).eval(), "flash-ltx": build_student(StudentSpec.load("flash-ltx"), config)[0]}
    h, w = args.height, args.width
    latents = torch.randn(1, config.latent_channels, 1 + args.chunk, h // 32, w // 32)
    print(
        f"LTX-Video {args.generation} (released widths, random weights) vs flash-ltx, {h}x{w}, steady chunks of "
        f"{args.chunk} latent frame(s), CPU {torch.get_num_threads()} threads, torch {torch.__version__}, eager"
    )
    print("\n| model | params (M) | GMACs/frame | MACs ratio | s/frame | measured speed-up | latency |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name, model in models.items():
        s = summarize(model, h, w, chunk=args.chunk)
        rows[name] = (s, steady_seconds_per_frame(model.eval(), latents, args.chunk, args.repeats))
    t_sum, t_time = rows["teacher"]
    for name, (s, sec) in rows.items():
        print(
            f"| {name} | {s.params_decoder / 1e6:.0f} | {s.macs_per_frame / 1e9:.1f} | "
            f"{t_sum.macs_steady / s.macs_steady:.1f}x | {sec:.3f} | {t_time / sec:.1f}x | {s.latency} |"
        )


class OneShot(torch.nn.Module):
    """The whole clip in one pass (upstream's form), the stream's conditioning baked in: the
    one-shot decode an ONNX Runtime session runs."""

    def __init__(self, model: torch.nn.Module, inputs: dict) -> None:
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(latents, (), full=True, **self.inputs)[0]


def timed(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def flush(args: argparse.Namespace) -> None:
    import tempfile

    import onnxruntime as ort

    from flashvaed import engines
    from flashvaed.engines.ort_backend import session_options
    from flashvaed.export.onnx_export import ExportOptions, export

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LTXConfig.released(args.generation, decoder_base=args.decoder_base, encoder_base=8)
    model = LTXVAE(config).eval()
    s, h, w, k = model.spatial_factor, args.height, args.width, args.chunk
    opts = {"seed": 0} if model.step_inputs else {}
    print(
        f"LTX-Video {args.generation} decoder (decoder_base {args.decoder_base}, random weights, latency "
        f"{model.latency}), {h}x{w}, chunk {k}, CPU {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; median of {args.repeats}, runs interleaved"
    )
    print("\n| latent frames | frames | runtime | one-shot s | stream s | stream / one-shot | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        shape = {"chunk": str(k), "height": str(h), "width": str(w), "batch": "1"}
        export(model, f"{tmp}/stream", ExportOptions(**shape))
        engine = engines.load(f"{tmp}/stream")
        for n in args.frames:
            latents = torch.randn(1, model.latent_channels, n, h // s, w // s)
            inputs = model.stream_inputs(1, h // s, w // s, **opts)
            graph = f"{tmp}/oneshot{n}.onnx"
            with torch.no_grad():
                torch.onnx.export(OneShot(model, inputs), (latents,), graph, input_names=["latents"], dynamo=False)
            # the engine's session options (threads, no spinning between runs): the same runtime either way
            session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
            feed = {"latents": latents.numpy()}
            with torch.inference_mode():
                ref = model.decode_clip(latents, **opts)
                z, sess = latents, session
                runs = {
                    "torch": (lambda z=z: model.decode_clip(z, **opts), lambda z=z: model.decode(z, k, **opts)),
                    "onnxruntime": (lambda s=sess, f=feed: s.run(None, f), lambda z=z: engine.decode(z, k, **opts)),
                }
                got = {"torch": model.decode(latents, k, **opts), "onnxruntime": engine.decode(latents, k, **opts)}
                for name, (one, stream) in runs.items():
                    one()  # warm-up
                    t_one, t_stream = [], []
                    for _ in range(args.repeats):
                        t_one.append(timed(one, 1))
                        t_stream.append(timed(stream, 1))
                    a, b = statistics.median(t_one), statistics.median(t_stream)
                    diff = (got[name] - ref).abs().max().item()
                    print(f"| {n} | {ref.shape[2]} | {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generation", default="0.9.1", choices=["0.9.0", "0.9.1", "0.9.5"])
    parser.add_argument("--decoder-base", type=int, default=32, help="memory runs: decoder base width (released 128)")
    parser.add_argument("--height", type=int, default=None, help="default 256 (memory) / 512 (speed)")
    parser.add_argument("--width", type=int, default=None, help="default 384 (memory) / 768 (speed)")
    parser.add_argument("--frames", type=int, nargs="+", default=[5, 21], help="latent frames per clip")
    parser.add_argument("--chunk", type=int, default=None, help="latent frames per push (default 2; speed: 1)")
    parser.add_argument("--speed", action="store_true", help="teacher vs flash-ltx speed at 512x768 instead")
    parser.add_argument("--flush", action="store_true", help="stream vs one-shot, torch and ONNX Runtime")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--_run", dest="mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_frames", dest="run_frames", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed:
        args.height, args.width, args.chunk = args.height or 512, args.width or 768, args.chunk or 1
        speed(args)
        return
    args.height, args.width, args.chunk = args.height or 256, args.width or 384, args.chunk or 2
    if args.flush:
        flush(args)
    elif args.mode:
        one_run(args)
    else:
        memory(args)


if __name__ == "__main__":
    main()
