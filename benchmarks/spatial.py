"""Exact spatial tiling (issue 22): peak memory, time per frame and halo overhead, untiled vs tiled.

Full-size Wan2.1 and Wan2.2 teachers and their flash students (random weights: speed and memory
do not depend on the values) decode a short clip (2 latent frames = the first chunk and one
steady chunk, 5 frames; chunk 1) at 480x832, 720x1280 and 1080x1920, untiled and tiled
(``flashvaed.engines.tiled``: whole clips go tile by tile, so only one tile's state and working
memory are alive). Each decode runs in a fresh process: its peak memory is the growth of the
peak resident set over the process after the model is built (the high-water mark is reset there,
``/proc/self/clear_refs``), and it is printed next to the model-free estimates
(``flashvaed.models.memory.decode_step_bytes`` of the tile's region vs the whole frame, and the
peak of the frame-wide modules run once on the whole latent frame). Latent sizes are the pixel
sizes over the spatial factor, rounded up (Wan2.2's 1080 rows: 68 latent rows, 1088 pixels).

Untiled decodes whose estimate does not fit the memory this machine may use (80% of what is
available, as flashvaed's own budget checks) are reported as "does not fit" and not run. A tiled
decode of many tiles can decode only its first ``--max-tiles`` tiles (every tile has the same
region, so the peak memory is measured; the frame-wide pass over all tiles runs in full; the
time of the remaining tiles is projected from the decoded ones and marked "~"). Runs whose
projected time exceeds what is left of ``--budget-s`` are not started and say so.

``--tile auto`` (the default) picks, per model, the largest square region whose estimated tile
peak at 1080p stays under 3/4 of the model's untiled 480p estimate: the acceptance line (a tiled
1080p decode under the untiled 480p figure) printed at the end compares the two measurements.

Tiled runs drop the traceback of each ``Captured`` stop (see ``sampled_tiles``; ``--as-is`` keeps
it, as ``flashvaed.engines.tiled`` does today). ``--patch-attention`` measures a proposed change
to Wan's attention (see ``patch_attention``).

    python benchmarks/spatial.py --families wan2.1 --budget-s 1200  # every row that fits 20 min
    python benchmarks/spatial.py --families wan2.1 --acceptance-only  # untiled 480p, tiled 1080p
    python benchmarks/spatial.py --families wan2.2 --models student --budget-s 600
    python benchmarks/spatial.py --tile 64 --max-tiles 0            # every tile decoded
    python benchmarks/spatial.py --halo-only                        # the halo-overhead tables only
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

SIZES = {"480": (480, 832), "720": (720, 1280), "1080": (1080, 1920)}
HALO_REGIONS = (32, 48, 64, 96)  # latent pixels, square regions, for the halo-overhead table
FRAMES = 2  # latent frames: the first chunk and one steady chunk -> 1 + 4 = 5 frames (Wan)
GIB = 2**30


def build(family: str, which: str) -> torch.nn.Module:
    """The full-size teacher of ``family`` (released configuration) or its ``flash-<family>``
    student built on it, freshly initialised (random weights, as ``student_speed.py``)."""
    from flashvaed.models import StudentSpec, families
    from flashvaed.models.student import build_student

    torch.manual_seed(0)
    fam = families.get(family)
    config = fam.config_type()
    if which == "teacher":
        return fam.teacher_type(config).eval()
    return build_student(StudentSpec.load(f"flash-{family}"), config)[0].eval()


def latent_size(size: str, factor: int) -> tuple[int, int]:
    height, width = SIZES[size]
    return math.ceil(height / factor), math.ceil(width / factor)


def parse_region(text: str) -> tuple[int, int]:
    from flashvaed.engines.tiled import parse_tile

    region = parse_tile(text)
    assert region is not None
    return region


# ---------------------------------------------------------------------------------------------
# the measurement, in a fresh process
# ---------------------------------------------------------------------------------------------
def _resident_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Reset the peak resident set to the current one (Linux), so the decode's peak is measured
    from the built model rather than from a transient of building it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sampled_tiles(inner: Any, tile: tuple[int, int], limit: int, drop_tracebacks: bool = True) -> Any:
    """A ``TiledDecoder`` that runs the frame-wide pass over every tile but decodes only the first
    ``limit`` tiles (0: all); the others give zeros. It records when each decoded tile starts.

    ``drop_tracebacks``: a tile's step stopped at a frame-wide module keeps the ``Captured``
    exception, whose traceback holds the stopped step's frames (the tile stream, its state and
    activations) in a reference cycle: every tile of the frame-wide pass stays alive until the
    cyclic collector runs, and the peak grows with the number of tiles. Dropping the traceback
    (what ``TileTorchStream`` should do itself; reported) frees each tile as it ends."""
    from flashvaed.engines.tiled import TiledDecoder, TileTorchStream
    from flashvaed.models.streaming import clocked

    class Sampled(TileTorchStream):
        owner: Any

        def _step(self, latents: torch.Tensor, first: bool) -> torch.Tensor:
            owner = self.owner
            if self.capture is None:  # the decoding pass (the frame-wide pass captures a module)
                if not hasattr(self, "ordinal"):
                    self.ordinal = len(owner.marks)
                    owner.marks.append(time.perf_counter())
                if owner.limit and self.ordinal >= owner.limit:
                    b, _, k, h, w = latents.shape
                    src, s = self.source, self.source.spatial_factor
                    t = 1 if first and not clocked(src) else src.temporal_factor * k
                    return torch.zeros(b, 3, t, h * s, w * s)
            try:
                return super()._step(latents, first)
            finally:
                if drop_tracebacks:
                    for captured in self.captured.values():
                        captured.__traceback__ = None

    class SampledTiles(TiledDecoder):
        def __init__(self) -> None:
            super().__init__(inner, tile)
            self.limit = limit
            self.marks: list[float] = []

        def tile_stream(self, options: dict[str, Any], tile: Any, frame: tuple[int, int]) -> Any:
            stream = super().tile_stream(options, tile, frame)
            if isinstance(stream, TileTorchStream):
                stream.__class__ = Sampled
                stream.owner = self  # type: ignore[attr-defined]
            return stream

    return SampledTiles()


def patch_attention() -> None:
    """Run ``AttentionBlock.forward`` with contiguous 4-D q, k, v (one head): torch's CPU flash
    kernel then serves it, with memory linear in the positions, where the 3-D call (or a 4-D one on
    the strided split of qkv) takes the math kernel and allocates positions^2 scores and
    probabilities (~9 GiB at 1080p for Wan2.1's 135x240 latent frame). A proposed change to
    ``flashvaed.models.blocks`` (same result to float rounding); the tiled frame-wide pass
    (``frame_resolve``) is not affected by it."""
    import torch.nn.functional as F

    from flashvaed.models import blocks

    def forward(self: Any, x: torch.Tensor, state: Any = (), first: bool = False) -> tuple[torch.Tensor, Any]:
        b, _, t, h, w = x.shape
        y = self.norm(blocks.fold_time(x))
        qkv = self.to_qkv(y).reshape(b * t, -1, h * w).transpose(1, 2)
        q, k, v = (p.unsqueeze(1).contiguous() for p in qkv.split([self.qk_dim, self.qk_dim, self.v_dim], dim=-1))
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        y = self.proj(y.transpose(1, 2).reshape(b * t, self.v_dim, h, w))
        return x + blocks.unfold_time(y, b), ()

    blocks.AttentionBlock.forward = forward  # type: ignore[method-assign]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model, decode the clip once (untiled or tiled), report memory and time."""
    from flashvaed.engines.torch_backend import TorchDecoder

    torch.set_grad_enabled(False)
    if spec["patch_attention"]:
        patch_attention()
    model = build(spec["family"], spec["model"])
    inner = TorchDecoder(model)
    h, w = spec["latent"]
    warm = torch.randn(1, model.latent_channels, 2, 5, 7)
    inner.decode(warm, chunk=1)  # first-call allocations (thread pools, kernels) before the baseline
    if spec["tile"] is None:
        decoder = inner
    else:
        decoder = sampled_tiles(inner, tuple(spec["tile"]), spec["max_tiles"], not spec["as_is"])
    z = torch.randn(1, model.latent_channels, FRAMES, h, w, generator=torch.Generator().manual_seed(1))
    del warm
    gc.collect()
    load = os.getloadavg()[0]
    reset = _reset_peak()
    base = _resident_peak()
    start = time.perf_counter()
    with torch.inference_mode():
        frames = decoder.decode(z, chunk=1)
    seconds = time.perf_counter() - start
    peak = _resident_peak()
    out: dict[str, Any] = {
        "decode_bytes": peak - base,
        "process_bytes": peak,
        "seconds": seconds,
        "frames": int(frames.shape[2]),
        "peak_reset": reset,
        "load": [round(load, 1), round(os.getloadavg()[0], 1)],  # 1-min load average before and after (2 cores)
    }
    if spec["tile"] is not None:
        tiles = len(decoder.grid(h, w))
        marks = decoder.marks
        decoded = min(tiles, spec["max_tiles"] or tiles)
        end = marks[decoded] if decoded < len(marks) else start + seconds
        out.update(
            tiles=tiles,
            tiles_decoded=decoded,
            frame_wide_seconds=marks[0] - start if marks else 0.0,
            tile_seconds=(end - marks[0]) / decoded if marks else seconds / tiles,
        )
        # the whole clip's time: the frame-wide pass, every tile as the decoded ones, the assembly
        out["projected_seconds"] = out["frame_wide_seconds"] + out["tile_seconds"] * tiles
        if decoded == tiles:
            out["projected_seconds"] = seconds
    return out


# ---------------------------------------------------------------------------------------------
# the plan: estimates without running anything
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelFacts:
    family: str
    model: str
    spatial: int
    halo: tuple[int, int]
    frame_wide: list[str]
    weights: int  # bytes of the parameters (the process holds them besides the decode)
    estimate: dict[tuple[int, int], int] = field(default_factory=dict)  # region -> decode_step_bytes
    wide: dict[tuple[int, int], int] = field(default_factory=dict)  # latent frame -> frame-wide pass bytes
    reports: dict[tuple[tuple[int, int], tuple[int, int]], dict] = field(default_factory=dict)


def frame_wide_bytes(model: torch.nn.Module, names: list[str], height: int, width: int) -> int:
    """Peak bytes of running every frame-wide module once on the whole latent frame of one chunk
    (what the tiled decode does per step in its frame-wide pass), on the meta device: a forward
    pre-hook on a probe decode finds each module's input channels and scale."""
    from flashvaed.engines.torch_backend import TorchDecoder
    from flashvaed.models.memory import peak_bytes

    modules = dict(model.named_modules())
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Any:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            shapes.setdefault(name, args[0].shape)

        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        TorchDecoder(model).decode(torch.randn(1, model.latent_channels, 2, 5, 7), chunk=1)
    finally:
        for handle in handles:
            handle.remove()
    peak = 0
    for n in names:
        b, c, _, sh, sw = shapes[n]
        shape = (b, c, 1, height * sh // 5, width * sw // 7)  # chunk 1: one latent frame per step
        meta = copy.deepcopy(modules[n]).to("meta")
        x = torch.zeros(shape, device="meta")
        peak = max(peak, peak_bytes(lambda meta=meta, x=x: meta.frame_resolve(x)) + x.numel() * 4)
    return peak


def gather_facts(
    family: str,
    which: str,
    sizes: list[str],
    regions: list[tuple[int, int]],
    fixed: tuple[int, int] | None,
    estimates: bool = True,
) -> tuple[ModelFacts, tuple[int, int] | None]:
    """The model's halo, memory estimates and tiling reports at every size and region, and its
    tile (``fixed``, or ``auto_tile``'s; without ``estimates``, tiling reports only)."""
    from flashvaed.engines.tiled import tiled
    from flashvaed.engines.torch_backend import TorchDecoder
    from flashvaed.models.memory import decode_step_bytes

    model = build(family, which)
    probe = tiled(TorchDecoder(model), (64, 64))
    s = model.spatial_factor
    facts = ModelFacts(
        family,
        which,
        s,
        tuple(probe.halo),  # type: ignore[arg-type]
        probe.tiling_report(8, 8)["frame_wide"],
        sum(p.numel() * p.element_size() for p in model.parameters()),
    )

    def estimate(region: tuple[int, int]) -> int:
        if region not in facts.estimate:
            facts.estimate[region] = decode_step_bytes(model, 1, 1, *region)
        return facts.estimate[region]

    frames = [latent_size(size, s) for size in sorted(set(sizes) | {"480", "1080"})]
    if estimates:
        for h, w in frames:
            estimate((h, w))
            facts.wide[(h, w)] = frame_wide_bytes(model, facts.frame_wide, h, w) if facts.frame_wide else 0
    tile = fixed or (auto_tile(facts, estimate) if estimates else None)
    for region in [*regions, *([tile] if tile else [])]:
        if min(region) < 2 * max(facts.halo) + 1:
            continue
        for h, w in frames:
            decoder = tiled(TorchDecoder(model), region)
            facts.reports[(region, (h, w))] = decoder.tiling_report(h, w)
            if estimates:
                estimate(max(t.size for t in decoder.grid(h, w)))
    return facts, tile  # the model is freed here, before any decode runs


def auto_tile(facts: ModelFacts, estimate: Any) -> tuple[int, int]:
    """The largest square region (multiples of 8 up to 160 latent px) whose estimated tile peak
    at 1080p stays under 3/4 of the untiled 480p estimate; at least the smallest the halo allows."""
    s = facts.spatial
    small, large = latent_size("480", s), latent_size("1080", s)
    bound = 0.75 * estimate(small)
    best = smallest = 2 * max(facts.halo) + 1
    for r in [smallest, *range(8 * (smallest // 8 + 1), 161, 8)]:
        if estimate((min(r, large[0]), min(r, large[1]))) <= bound:
            best = r
    return best, best


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    facts: ModelFacts
    size: str
    tile: tuple[int, int] | None
    result: dict[str, Any] | None = None
    note: str = ""

    @property
    def latent(self) -> tuple[int, int]:
        return latent_size(self.size, self.facts.spatial)

    def region(self) -> tuple[int, int]:
        if self.tile is None:
            return self.latent
        h, w = self.latent
        return min(self.tile[0], h), min(self.tile[1], w)

    def report(self) -> dict[str, Any] | None:
        return None if self.tile is None else self.facts.reports.get((self.tile, self.latent))


def in_pair(row: Row) -> bool:
    """Whether a row is one of the acceptance pair: untiled 480p, tiled 1080p."""
    return (row.size, row.tile is None) in (("480", True), ("1080", False))


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def available_bytes() -> int:
    """What one decode may use here: flashvaed's own budget (80% of the memory available now)."""
    from flashvaed.safeload import work_budget

    return work_budget()


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at the budget ({timeout:.0f} s)"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"failed (exit {done.returncode}): {tail[0][:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


class Budget:
    """What is left of the time budget, and each model's measured speed to project runs with."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.per_position: dict[tuple[str, str], float] = {}  # s per decoded latent position (5-frame clip)
        self.wide_per_position: dict[tuple[str, str], float] = {}  # frame-wide pass, s per tile position

    def left(self) -> float:
        return self.end - time.perf_counter()

    def project(self, row: Row, max_tiles: int) -> float | None:
        key = (row.facts.family, row.facts.model)
        rate = self.per_position.get(key)
        if rate is None:
            return None
        rh, rw = row.region()
        if row.tile is None:
            return rate * rh * rw
        tiles = row.report()["tiles"]  # type: ignore[index]
        decoded = min(tiles, max_tiles or tiles)
        wide = self.wide_per_position.get(key, 0.02 * rate)  # before a tiled run: ~conv_in + middle's share
        return rate * rh * rw * decoded + wide * rh * rw * tiles

    def learn(self, row: Row) -> None:
        r = row.result
        if not r or "error" in r:
            return
        key = (row.facts.family, row.facts.model)
        rh, rw = row.region()
        if row.tile is None:
            self.per_position[key] = r["seconds"] / (rh * rw)
        else:
            self.per_position.setdefault(key, r["tile_seconds"] / (rh * rw))
            self.wide_per_position[key] = r["frame_wide_seconds"] / (rh * rw * r["tiles"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="wan2.1,wan2.2", help="comma-separated (wan2.1, wan2.2)")
    parser.add_argument("--sizes", default="480,720,1080", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--models", default="teacher,student", help="teacher, student (flash-<family>) or both")
    parser.add_argument("--tile", default="auto", help="region HxW or N latent pixels, or auto (see above)")
    parser.add_argument("--max-tiles", type=int, default=1, help="tiles decoded per tiled run (0: all)")
    parser.add_argument("--modes", default="untiled,tiled", help="untiled, tiled or both")
    parser.add_argument("--budget-s", type=float, default=2400, help="wall-clock seconds for the decodes")
    parser.add_argument("--memory-gib", type=float, default=None, help="memory a decode may use (default: 80%% free)")
    parser.add_argument(
        "--as-is", action="store_true", help="keep the Captured tracebacks (tiled.py as it is; see sampled_tiles)"
    )
    parser.add_argument(
        "--patch-attention", action="store_true", help="contiguous 4-D q/k/v in Wan's attention (see patch_attention)"
    )
    parser.add_argument(
        "--acceptance-only", action="store_true", help="decode only the untiled 480p and tiled 1080p rows"
    )
    parser.add_argument("--halo-only", action="store_true", help="print the halo-overhead tables only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    families = [f for f in args.families.split(",") if f]
    sizes = [s for s in args.sizes.split(",") if s]
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for s in sizes:
        if s not in SIZES:
            parser.error(f"--sizes: {s!r} is not one of {', '.join(SIZES)}")
    for m in models:
        if m not in ("teacher", "student"):
            parser.error(f"--models: {m!r} is not teacher or student")
    for m in modes:
        if m not in ("untiled", "tiled"):
            parser.error(f"--modes: {m!r} is not untiled or tiled")
    from flashvaed.models import families as known

    for family in families:
        if family not in ("wan2.1", "wan2.2") or family not in known.names():
            parser.error(f"--families: {family!r} is not wan2.1 or wan2.2")
    fixed = None if args.tile == "auto" else parse_region(args.tile)
    regions = [(r, r) for r in HALO_REGIONS]
    print(
        f"CPU {torch.get_num_threads()} threads, torch {torch.__version__}, eager fp32, random weights; "
        f"{FRAMES} latent frames -> 5 frames, chunk 1; memory this machine may use: {gib(available_bytes())} GiB"
        + ("; tiled.py as it is (Captured tracebacks kept)" if args.as_is else "")
        + ("; attention patched to contiguous 4-D q/k/v" if args.patch_attention else "")
    )

    facts: dict[tuple[str, str], ModelFacts] = {}
    tiles: dict[tuple[str, str], Any] = {}
    for family in families:
        for which in ("teacher", "student"):
            if which in models:
                facts[(family, which)], tiles[(family, which)] = gather_facts(
                    family, which, sizes, regions, fixed, estimates=not args.halo_only
                )

    for f in facts.values():
        if fixed and min(fixed) < 2 * max(f.halo) + 1:
            parser.error(
                f"--tile {args.tile}: {f.family}'s halo of {max(f.halo)} needs a region of {2 * max(f.halo) + 1}"
            )
    print_halo_tables(facts, sizes, tiles)
    if args.halo_only:
        return

    rows: list[Row] = []
    for family in families:
        for which in ("teacher", "student"):
            for size in sizes:
                for mode in modes:
                    if which in models:
                        tile = None if mode == "untiled" else tiles[(family, which)]
                        rows.append(Row(facts[(family, which)], size, tile))

    def priority(row: Row) -> tuple[int, int]:
        """The acceptance pair (untiled 480p, tiled 1080p) first, then the rest; teachers first."""
        return (0 if in_pair(row) else 1, 0 if row.facts.model == "teacher" else 1)

    if args.acceptance_only:
        rows = [row for row in rows if in_pair(row)]

    budget = Budget(args.budget_s)
    for row in sorted(rows, key=priority):
        f = row.facts
        limit = int(args.memory_gib * GIB) if args.memory_gib else available_bytes()
        need = (max(f.estimate[row.region()], f.wide[row.latent]) if row.tile else f.estimate[row.latent]) + f.weights
        if need > limit:
            row.note = (
                f"does not fit (estimate {gib(need - f.weights)} GiB + {gib(f.weights)} GiB of weights > "
                f"{gib(limit)} GiB)"
            )
            continue
        projected = budget.project(row, args.max_tiles)
        if projected is not None and projected > budget.left():
            row.note = f"not run: projected {projected:.0f} s, {max(budget.left(), 0):.0f} s of the budget left"
            continue
        if budget.left() <= 0:
            row.note = "not run: budget spent"
            continue
        spec = {
            "family": f.family,
            "model": f.model,
            "latent": list(row.latent),
            "tile": list(row.tile) if row.tile else None,
            "max_tiles": args.max_tiles,
            "as_is": args.as_is,
            "patch_attention": args.patch_attention,
        }
        label = (
            f"{f.family} {f.model} {row.size} {'untiled' if row.tile is None else f'tile {row.tile[0]}x{row.tile[1]}'}"
        )
        print(f"... {label} (projected {projected or float('nan'):.0f} s)", flush=True)
        row.result = run_child(spec, max(budget.left(), 60) + 30)
        if "error" in row.result:
            row.note = row.result["error"]
        budget.learn(row)
        print(f"    {json.dumps(row.result)}", flush=True)

    print_results(rows)
    print_acceptance(rows, facts)


def plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def size_label(size: str, spatial: int) -> str:
    h, w = latent_size(size, spatial)
    return f"{h * spatial}x{w * spatial} ({h}x{w})"


def print_halo_tables(facts: dict[tuple[str, str], ModelFacts], sizes: list[str], tiles: dict) -> None:
    print("\nHalo overhead per region: tiles, and positions decoded / frame positions (tiling_report 'redundancy')")
    for family in dict.fromkeys(fa for fa, _ in facts):
        mine = {w: f for (fa, w), f in facts.items() if fa == family}
        for halo in dict.fromkeys(f.halo for f in mine.values()):
            group = [w for w, f in mine.items() if f.halo == halo]
            f = mine[group[0]]
            print(
                f"\n{family} ({', '.join(group)}): halo {halo[0]}x{halo[1]} latent px "
                f"({halo[0] * f.spatial} output px), frame-wide: {', '.join(f.frame_wide) or 'none'}"
            )
            print("| region (latent px) | " + " | ".join(size_label(s, f.spatial) for s in sizes) + " |")
            print("|---|" + "---:|" * len(sizes))
            for region in sorted({r for r, _ in f.reports}):
                cells = []
                for s in sizes:
                    rep = f.reports.get((region, latent_size(s, f.spatial)))
                    cells.append(
                        "-"
                        if rep is None
                        else f"{rep['tiles']} {plural(rep['tiles'], 'tile')}, {rep['redundancy']:.2f}x"
                    )
                chosen = [w for w in group if tiles[(family, w)] == region]
                mark = f" (tile used: {', '.join(chosen)})" if chosen else ""
                print(f"| {region[0]}x{region[1]}{mark} | " + " | ".join(cells) + " |")
            print(f"(regions under {2 * max(halo) + 1} cannot hold the halo on both sides; 1.00x: one tile)")


def print_results(rows: list[Row]) -> None:
    print(
        "\nPeak memory (decode: growth of the peak resident set over the built model) and time per output frame; "
        "load: 1-min load average before/after the decode (2 cores; above 2, other jobs shared them)"
    )
    print(
        "| family | model | size (latent) | mode | tiles | halo overhead | estimate GiB: tile / frame | "
        "frame-wide pass est. GiB | measured decode GiB | s/frame | load | note |"
    )
    print("|---|---|---|---|---:|---:|---|---:|---:|---:|---|---|")
    for row in rows:
        f = row.facts
        size = size_label(row.size, f.spatial)
        rep = row.report()
        r = row.result or {}
        tiles_cell = "1" if row.tile is None else str(rep["tiles"]) if rep else "?"
        overhead = "1.00x" if row.tile is None else f"{rep['redundancy']:.2f}x" if rep else "?"
        est = f"{gib(f.estimate[row.region()])} / {gib(f.estimate[row.latent])}"
        wide = gib(f.wide[row.latent]) if row.tile else "-"
        measured, speed, note, load = "-", "-", row.note, "-"
        if r and "error" not in r:
            measured = gib(r["decode_bytes"])
            load = f"{r['load'][0]:.1f}/{r['load'][1]:.1f}"
            if row.tile is None or r["tiles_decoded"] == r["tiles"]:
                speed = f"{r['seconds'] / r['frames']:.2f}"
            else:
                speed = f"~{r['projected_seconds'] / r['frames']:.2f}"
                note = (
                    f"{r['tiles_decoded']} of {r['tiles']} tiles decoded ({r['tile_seconds']:.1f} s each), "
                    f"frame-wide pass {r['frame_wide_seconds']:.1f} s; the rest projected"
                )
            if not r.get("peak_reset"):
                note = (note + "; " if note else "") + "peak not reset after building (upper bound)"
        mode = "untiled" if row.tile is None else f"tiled {row.tile[0]}x{row.tile[1]}"
        print(
            f"| {f.family} | {f.model} | {size} | {mode} | {tiles_cell} | {overhead} | {est} | {wide} | "
            f"{measured} | {speed} | {load} | {note} |"
        )


def print_acceptance(rows: list[Row], facts: dict) -> None:
    print("\nAcceptance: peak memory of a tiled 1080p decode vs the untiled 480p decode (measured; estimate)")
    print("| family | model | untiled 480p GiB | tiled 1080p GiB (tile) | tiled / untiled | holds |")
    print("|---|---|---:|---:|---:|---|")
    for (family, which), f in facts.items():
        small = next((r for r in rows if r.facts is f and r.size == "480" and r.tile is None), None)
        large = next((r for r in rows if r.facts is f and r.size == "1080" and r.tile is not None), None)
        if small is None or large is None:
            continue

        def cell(row: Row, f: ModelFacts = f) -> tuple[float | None, str]:
            est = max(f.estimate[row.region()], f.wide[row.latent]) if row.tile else f.estimate[row.latent]
            r = row.result or {}
            if r and "error" not in r:
                return r["decode_bytes"], f"{gib(r['decode_bytes'])} (est. {gib(est)})"
            return None, f"not measured (est. {gib(est)})"

        (a, ta), (b, tb) = cell(small), cell(large)
        ratio = f"{b / a:.2f}" if a and b else "-"
        holds = ("yes" if b < a else "NO") if a and b else "-"
        tile = f"{large.tile[0]}x{large.tile[1]}" if large.tile else ""
        print(f"| {family} | {which} | {ta} | {tb} ({tile}) | {ratio} | {holds} |")


if __name__ == "__main__":
    main()
