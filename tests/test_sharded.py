"""Spatially sharded decoding across processes equals single-process decoding.

The test launches this file as a 2-process job with torch.distributed's own launcher (gloo on the
CPU); every rank builds the same tiny teachers from a seed, decodes sharded, and saves what it got.
The oracle is the plain single-process decode (or stream, with the same pushes) of the same model,
here in the test process. One launch runs every check that leaves the processes alive (the
bad-input cases included: each must fail on both ranks with the same line and leave the group
usable for the next call); a second launch lets an error end both processes.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile import assert_refused

from flashvaed.errors import FlashVAEDError, InputError
from flashvaed.models import families
from flashvaed.models.tiling import plan_tiling

WIDTH = {"wan2.1": 6, "mochi": 6, "ltx": 4}
TOL = 1e-5


@functools.cache
def build(name: str, seed: int = 0) -> Any:
    """A tiny teacher of ``name`` with random weights, its norms' gains and biases moved off their
    initial values (so that every norm's statistics matter), the same on every rank."""
    family = families.get(name)
    torch.manual_seed(seed)
    model = family.teacher_type(family.tiny_config())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and p.dim() == 1:
                p.copy_((1.0 if pname.endswith(("weight", "gamma")) else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


def rows(model: Any) -> int:
    """A latent height that splits into two bands each reaching past the other's core: 2 * halo + 4."""
    return 2 * plan_tiling(model).halo[0] + 4


def latents(model: Any, frames: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, model.latent_channels, frames, height, width, generator=g)


# ---------------------------------------------------------------------------------------------
# the worker: what every rank runs under the launcher
# ---------------------------------------------------------------------------------------------
def _stream(decoder: Any, z: torch.Tensor, pushes: list[int], **options: Any) -> torch.Tensor:
    stream = decoder.stream(**options)
    pieces, at = [], 0
    for n in pushes:
        pieces.append(stream.push(z[:, :, at : at + n]))
        at += n
    pieces.append(stream.close())
    return torch.cat(pieces, dim=2)


def _resumed(decoder: Any, z: torch.Tensor, first: int, **options: Any) -> torch.Tensor:
    """A stream pushed ``first`` latent frames, its state saved, and another stream going on from it."""
    stream = decoder.stream(**options)
    head = stream.push(z[:, :, :first])
    state = stream.save_state()
    stream = decoder.stream(**options)
    stream.load_state(state)
    return torch.cat([head, stream.push(z[:, :, first:]), stream.close()], dim=2)


def worker_checks(out: Path) -> None:
    from flashvaed.engines.sharded import init_distributed, sharded
    from flashvaed.engines.torch_backend import TorchDecoder

    rank, world = init_distributed()
    results: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    reports: dict[str, Any] = {}

    def attempt(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except InputError as e:
            errors[name] = str(e)

    wan, mochi, ltx = build("wan2.1"), build("mochi"), build("ltx")
    d_wan = sharded(TorchDecoder(wan))
    zw = latents(wan, 3, rows(wan), WIDTH["wan2.1"])
    reports["wan2.1"] = d_wan.sharding_report(*zw.shape[3:])
    attempt("wan2.1/decode", lambda: d_wan.decode(zw, chunk=2))
    zs = latents(wan, 4, rows(wan), WIDTH["wan2.1"], seed=2)
    attempt("wan2.1/stream", lambda: _stream(d_wan, zs, [3, 1]))
    attempt("wan2.1/resumed", lambda: _resumed(d_wan, zs, 3))

    # bad input: refused on both ranks alike, and the group stays usable
    attempt("error/small", lambda: d_wan.decode(latents(wan, 2, 1, 4), chunk=1))
    attempt("error/shape", lambda: d_wan.decode(latents(wan, 2, rows(wan) - 2 * rank, 4), chunk=1))
    attempt("error/chunk", lambda: d_wan.decode(zw, chunk=1 + rank))
    attempt("error/values", lambda: d_wan.decode(latents(wan, 2, rows(wan), 4, seed=10 + rank), chunk=1))
    nan = zw.clone()
    if rank == 1:
        nan[0, 0, 0, 0, 0] = float("nan")
    attempt("error/nan", lambda: d_wan.decode(nan, chunk=1))
    attempt("error/model", lambda: sharded(TorchDecoder(build("wan2.1", seed=rank))))
    attempt("error/gather", lambda: sharded(TorchDecoder(wan), gather="all" if rank else "rank0"))
    attempt("error/options", lambda: sharded(TorchDecoder(ltx)).stream(seed=rank))

    def final_differs() -> torch.Tensor:
        stream = d_wan.stream()
        return stream.push(zw[:, :, :2], final=rank == 0)

    attempt("error/final", final_differs)
    attempt("wan2.1/again", lambda: d_wan.decode(zw, chunk=2))
    # float64 models: the split itself is exact, far below float32's rounding (frames come back float32)
    attempt("wan2.1/fp64", lambda: sharded(TorchDecoder(copy.deepcopy(wan).double())).decode(zw, chunk=2))

    d_mochi = sharded(TorchDecoder(mochi), gather="rank0")
    zm = latents(mochi, 3, rows(mochi), WIDTH["mochi"])
    reports["mochi"] = d_mochi.sharding_report(*zm.shape[3:])
    attempt("mochi/decode", lambda: d_mochi.decode(zm, chunk=1))
    attempt("mochi/fp64", lambda: sharded(TorchDecoder(copy.deepcopy(mochi).double())).decode(zm, chunk=1))

    d_ltx = sharded(TorchDecoder(ltx))
    zl = latents(ltx, 3, rows(ltx), WIDTH["ltx"])
    reports["ltx"] = d_ltx.sharding_report(*zl.shape[3:])
    attempt("ltx/decode", lambda: d_ltx.decode(zl, chunk=2, seed=3))
    attempt("ltx/stream", lambda: _stream(d_ltx, zl, [2, 1], seed=4, timestep=0.1))
    attempt("ltx/resumed", lambda: _resumed(d_ltx, zl, 2, seed=4, timestep=0.1))
    d_ltx0 = sharded(d_ltx, gather="rank0")
    attempt("ltx/stream-rank0", lambda: _stream(d_ltx0, zl, [1, 2], seed=4))

    torch.save({"results": results, "errors": errors, "world": world}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(reports))


def worker_exit(out: Path) -> None:
    """A bad input nobody catches: every rank must end with the same one-line message (exit 2)."""
    from flashvaed.engines.sharded import init_distributed, sharded
    from flashvaed.engines.torch_backend import TorchDecoder

    rank, _ = init_distributed()
    try:
        wan = build("wan2.1")
        sharded(TorchDecoder(wan)).decode(latents(wan, 2, rows(wan) + rank, 4), chunk=1)
    except FlashVAEDError as e:  # as the command line does: one line, exit 2
        (out / f"rank{rank}.err").write_text(str(e))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path, nproc: int = 2, monitor: float = 0.1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU, one thread per rank
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--monitor-interval",
        str(monitor),
    ]
    cmd += ["--master-port", str(free_port()), __file__, mode, str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sharded")
    proc = launch("checks", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = []
    for r in range(2):
        got = torch.load(out / f"rank{r}.pt")
        got["reports"] = json.loads((out / f"rank{r}.json").read_text())
        ranks.append(got)
    return ranks


def single(name: str, z: torch.Tensor, chunk: int, dtype: torch.dtype = torch.float32, **options: Any) -> torch.Tensor:
    from flashvaed.engines.torch_backend import TorchDecoder

    return TorchDecoder(copy.deepcopy(build(name)).to(dtype)).decode(z, chunk=chunk, **options)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape
    assert 0.05 < want.std() and (want.abs() < 0.99).float().mean() > 0.5  # real values, not the clamp
    assert (got - want).abs().max().item() <= tol


@pytest.mark.parametrize(
    ("case", "name", "frames", "chunk", "options"),
    [
        ("wan2.1/decode", "wan2.1", 3, 2, {}),  # the middle attention: cores placed into the frame
        ("wan2.1/again", "wan2.1", 3, 2, {}),  # after the bad-input cases: the group is still in step
        ("mochi/decode", "mochi", 3, 1, {}),  # group norms: statistics summed over the ranks
        ("ltx/decode", "ltx", 3, 2, {"seed": 3}),  # latency (a clock), timestep and injected noise
    ],
)
def test_sharded_decode_equals_single_process(checks, case, name, frames, chunk, options):
    model = build(name)
    want = single(name, latents(model, frames, rows(model), WIDTH[name]), chunk, **options)
    assert_close(checks[0]["results"][case], want)
    if case.startswith("mochi"):  # gather="rank0": the other rank has no rows, but the frame count
        assert checks[1]["results"][case].shape == (*want.shape[:3], 0, want.shape[4])
    else:  # gather="all": every rank has the frames
        assert torch.equal(checks[1]["results"][case], checks[0]["results"][case])


@pytest.mark.parametrize(("case", "name", "chunk"), [("wan2.1/fp64", "wan2.1", 2), ("mochi/fp64", "mochi", 1)])
def test_sharded_float64_decode_is_exact_to_float32_rounding(checks, case, name, chunk):
    model = build(name)
    want = single(name, latents(model, 3, rows(model), WIDTH[name]), chunk, torch.float64)
    assert_close(checks[0]["results"][case], want, tol=2e-7)  # one float32 rounding of values in [-1, 1]


def test_sharded_streams_with_uneven_pushes(checks):
    from flashvaed.engines.torch_backend import TorchDecoder

    wan = build("wan2.1")
    zs = latents(wan, 4, rows(wan), WIDTH["wan2.1"], seed=2)
    want = _stream(TorchDecoder(wan), zs, [3, 1])
    assert_close(checks[0]["results"]["wan2.1/stream"], want)
    assert_close(checks[0]["results"]["wan2.1/resumed"], want)  # each rank saved and loaded its band's state
    ltx = build("ltx")
    zl = latents(ltx, 3, rows(ltx), WIDTH["ltx"])
    want = _stream(TorchDecoder(ltx), zl, [2, 1], seed=4, timestep=0.1)
    assert_close(checks[0]["results"]["ltx/stream"], want)
    assert_close(checks[0]["results"]["ltx/resumed"], want)  # the clock's position travels with the state
    assert torch.equal(checks[1]["results"]["ltx/stream"], checks[0]["results"]["ltx/stream"])
    want = _stream(TorchDecoder(ltx), zl, [1, 2], seed=4)
    assert_close(checks[0]["results"]["ltx/stream-rank0"], want)
    assert checks[1]["results"]["ltx/stream-rank0"].shape[2:4] == (want.shape[2], 0)


def test_bands_split_the_frame_and_cost_their_halos(checks):
    for name, report in checks[0]["reports"].items():
        model = build(name)
        h, halo = rows(model), plan_tiling(model).halo[0]
        assert report["halo"] == halo
        assert report["cores"] == [[0, h // 2], [h // 2, h]]
        assert report["regions"] == [[0, h // 2 + halo], [h // 2 - halo, h]]
        assert report["largest_share"] < 1  # each rank decodes less than the frame
        assert report["redundancy"] == pytest.approx((h + 2 * halo) / h)
    assert checks[0]["reports"]["wan2.1"]["frame_wide"] == ["decoder.middle.blocks.1"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("error/small", "a latent frame 1 row tall cannot be split across 2 ranks"),
        ("error/shape", "disagree on the latents' shape"),
        ("error/chunk", "disagree on the chunk (rank 0 1; rank 1 2)"),
        ("error/values", "disagree on the latents' values"),
        ("error/nan", "on rank 1 of 2: latents contain NaN or Inf values"),
        ("error/model", "disagree on the model's weights"),
        ("error/gather", "disagree on where frames are gathered"),
        ("error/options", "disagree on the stream options"),
        ("error/final", "disagree on whether the push is final"),
    ],
)
def test_bad_input_is_refused_on_every_rank_alike(checks, case, words):
    messages = [c["errors"].get(case) for c in checks]
    assert messages[0] is not None and messages[0] == messages[1], messages
    assert words in messages[0] and "\n" not in messages[0]
    assert case not in checks[0]["results"]


def test_an_uncaught_error_ends_every_rank_with_one_line(tmp_path):
    proc = launch("exit", tmp_path, monitor=1.0)  # the launcher ends the others once it sees one exit: not at once
    assert proc.returncode != 0
    lines = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert lines[0] == lines[1] and "disagree on the latents' shape" in lines[0] and "\n" not in lines[0]
    assert proc.stderr.count(f"error: {lines[0]}") == 2


def test_refused_without_a_process_group_or_for_engines(monkeypatch):
    import torch.distributed as dist

    from flashvaed.engines.sharded import bands, sharded
    from flashvaed.engines.tiled import tiled
    from flashvaed.engines.torch_backend import TorchDecoder

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    decoder = TorchDecoder(build("mochi"))
    with pytest.raises(InputError, match="runs under torchrun .* no process group is initialised"):
        sharded(decoder)
    with pytest.raises(InputError, match="runs torch models"):
        sharded(tiled(decoder, (8, 8)))
    with pytest.raises(InputError, match="gather must be one of all, rank0"):
        sharded(decoder, gather="rank1")
    # the smallest frame N ranks split: N rows, each rank one core row
    assert [t.core for t in bands(3, 5, 3, 2)] == [(0, 1, 0, 5), (1, 2, 0, 5), (2, 3, 0, 5)]
    assert [t.region for t in bands(3, 5, 3, 2)] == [(0, 3, 0, 5)] * 3
    assert [t.core[:2] for t in bands(11, 2, 3, 1)] == [(0, 4), (4, 8), (8, 11)]
    with pytest.raises(InputError, match="at least 4 latent rows tall"):
        bands(3, 5, 4, 1)


def test_decode_command_shards_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 -m flashvaed.cli decode ... --shard spatial``: rank 0 writes
    the frames, which equal the single-process command's; the other rank writes nothing."""
    from flashvaed import api
    from flashvaed.demo import embedded_teacher_path

    model = embedded_teacher_path("wan2.1")
    torch.manual_seed(7)
    torch.save(torch.randn(1, 16, 2, 9, 6), tmp_path / "z.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += ["-m", "flashvaed.cli", "decode", str(tmp_path / "z.pt"), "-m", str(model), "-o", str(tmp_path / "s.pt")]
    proc = subprocess.run([*cmd, "--shard", "spatial", "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("decoded 1x5 frames 72x48") == 1  # rank 0 alone reports (and writes)
    api.decode(tmp_path / "z.pt", model, tmp_path / "one.pt")
    a, b = (torch.load(tmp_path / f, weights_only=True)["frames"] for f in ("s.pt", "one.pt"))
    assert a.shape == b.shape and (a - b).abs().max() <= TOL


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tile", "30"], "--shard splits frames across ranks: give it without --tile or --max-memory"),
        (["--max-memory", "1GB"], "--shard splits frames across ranks: give it without --tile or --max-memory"),
        (["--compile", "inductor"], "--shard ranks run eager steps: give it without --compile"),
    ],
)
def test_shard_refuses_what_it_cannot_combine_before_joining_a_group(extra, needle, tmp_path):
    """One line, exit 2 and nothing written, before any process group is joined: no launcher is
    needed to see it."""
    from typer.testing import CliRunner

    from flashvaed.cli import app
    from flashvaed.demo import embedded_teacher_path

    torch.save(torch.randn(1, 16, 2, 9, 6), tmp_path / "z.pt")
    argv = ["decode", tmp_path / "z.pt", "-m", embedded_teacher_path("wan2.1"), "-o", tmp_path / "s.pt"]
    r = CliRunner().invoke(app, [str(a) for a in [*argv, "--shard", "spatial", *extra]])
    assert_refused(r.output, r.exit_code, needle, tmp_path / "s.pt", None)


if __name__ == "__main__":  # under the launcher: python -m torch.distributed.run ... test_sharded.py MODE OUT
    {"checks": worker_checks, "exit": worker_exit}[sys.argv[1]](Path(sys.argv[2]))
