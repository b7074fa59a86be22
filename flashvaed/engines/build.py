"""Turn an export directory into an engine directory for one backend.

An engine directory holds the backend's files and a manifest: the export's contract plus a
``backend`` section saying how to run them. ONNX Runtime engines are optimised models saved with
their session options and provider list; TensorRT engines are plan files built with
optimisation profiles from the contract's shape ranges.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from ..atomic import atomic_output, final_path
from ..errors import InputError
from ..export.contract import ENGINE_FORMAT, EXPORT_FORMAT, OURS, Contract, is_ours, read_manifest
from ..progress import Bar, progress_bar
from .ort_backend import (
    MAX_THREADS,
    check_precision,
    check_providers,
    default_providers,
    load_session,
    session_options,
)

BACKENDS = ("onnxruntime", "tensorrt")
# Saved optimised models stay portable at the extended level; hardware-specific layout
# transforms of ORT_ENABLE_ALL are applied again when the engine is loaded.
SAVE_LEVEL = "ORT_ENABLE_EXTENDED"
RUN_LEVEL = "ORT_ENABLE_ALL"


def build_engine(
    export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    backend: str = "onnxruntime",
    providers: list[str] | None = None,
    threads: int = 0,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float = 4.0,
    progress: bool = False,
) -> Contract:
    """Build ``out_dir`` from the export in ``export_dir``; returns the engine's contract.
    ``progress``: a bar on stderr, one step per graph (TensorRT builds take minutes each)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (use {' or '.join(BACKENDS)})")
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        limit = f"0 (all cores) or a count up to {MAX_THREADS}"
        raise InputError(f"{{threads}} must be {limit}, got {threads!r}", "threads")
    if not 0 < workspace_gib <= 1024:
        raise InputError(f"{{workspace_gib}} must be a size in GiB in (0, 1024], got {workspace_gib}", "workspace_gib")
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    contract = read_manifest(export_dir)
    if contract.format != EXPORT_FORMAT:
        raise InputError(f"{export_dir} is already an engine; build engines from an export directory")
    if backend == "onnxruntime":
        check_precision(contract)  # an engine its decoder would refuse to load is not written
    if backend == "tensorrt":
        from .tensorrt_backend import refuse_windows, require_tensorrt

        refuse_windows(export_dir, contract)  # what no TensorRT builds, refused where TensorRT is absent too
        require_tensorrt()  # fail before any output exists
    with (
        atomic_output(out_dir, directory=True, replaceable=is_ours, what=OURS) as tmp,
        progress_bar(f"building {backend}", len(contract.files), progress, info=True) as bar,
    ):
        if backend == "onnxruntime":
            contract.backend = _build_onnxruntime(export_dir, contract, tmp, providers, threads, bar)
        else:
            from .tensorrt_backend import build

            cache = Path(timing_cache) if timing_cache else None
            contract.backend = build(export_dir, contract, tmp, cache, workspace_gib, bar)
            contract.files = dict(contract.backend["plan_files"])  # the engine directory holds plans
        contract.format = ENGINE_FORMAT
        contract.backend["source_export"] = final_path(export_dir)
        if contract.model.get("source"):  # an export written before sources were recorded by their final names
            contract.model["source"] = final_path(contract.model["source"])
        (tmp / "manifest.json").write_text(contract.to_json())
    return contract


def _build_onnxruntime(
    export_dir: Path, contract: Contract, out: Path, providers: list[str] | None, threads: int, bar: Bar
) -> dict:
    providers = check_providers(providers or default_providers())
    files = {}
    for i, (graph, name) in enumerate(contract.files.items()):
        bar.update(1 if i else 0, info=graph)  # the graph being built
        options = session_options({"graph_optimization_level": SAVE_LEVEL, "intra_op_num_threads": threads})
        files[graph] = f"{graph}.optimized.onnx"
        options.optimized_model_filepath = str(out / files[graph])
        session = load_session(export_dir, name, options, providers)  # writes the optimised file
        started = session.get_providers()
        failed = [p for p in providers if p not in started]
        if failed:  # ONNX Runtime falls back to the CPU silently, e.g. CUDA listed but no GPU here
            raise InputError(
                f"ONNX Runtime could not start {', '.join(failed)} here (no GPU or its libraries are missing); "
                f"it ran with {', '.join(started)}"
            )
    bar.update(info="")
    contract.files = files
    return {
        "name": "onnxruntime",
        "onnxruntime_version": ort.__version__,
        "providers": providers,
        "session_options": {"graph_optimization_level": RUN_LEVEL, "intra_op_num_threads": threads},
        "saved_optimization_level": SAVE_LEVEL,
    }
