#!/usr/bin/env bash
# Issue 23's GPU checks in one short lease of a CUDA machine (about 10 minutes on an H200), most
# telling first, each part under its own timeout so one that hangs leaves the others their time:
#   1. gpu_suite profile: where a steady step's device time goes, per kernel, in the model's loop and
#      through the production stream; the production CUDA-graph stream's memory point by point;
#   2. the production API's bench, Wan2.1 teacher vs flash-wan2.1 at 480x832, 81 frames, bf16,
#      compiled (auto: CUDA graphs of the steady step), diffusers' AutoencoderKLWan beside;
#   3. gpu_suite: exactness, every family's compiled streams vs eager, the streaming decode per mode
#      (eager, CUDA graph, channels-last, cuDNN's benchmark mode, inductor with CUDA graphs);
#   4. bench with the frames kept on the GPU (--frames-on device, what FlashVAE does), compiled and eager;
#   5. gpu_suite: the Triton kernel vs cuDNN, half-precision fidelity and peak memory (17 frames).
# Usage: OUT=folder bash benchmarks/gpu_lease.sh   (diffusers may come as wheels in .whl/, see below)
set -u
OUT=${OUT:-benchmarks/gpu_lease_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=200
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (the GPU image has no diffusers)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
log=$OUT/lease.log
{
    nvidia-smi -L
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    size=(--height 480 --width 832 --frames 81 --chunk 2 --device cuda --dtype bfloat16)
    echo "== gpu_suite: profile (where a steady step's device time goes; production CUDA graph memory)"
    timeout 60 python3 benchmarks/gpu_suite.py --sections profile --budget-s 50 --out "$OUT/profile"
    echo "== bench: compiled (auto) with diffusers"
    timeout 170 python3 -m flashvaed bench flash-wan2.1 --teacher wan2.1 --runtime compiled "${size[@]}" \
        --repeats 3 -q --json "$OUT/bench_compiled.json"
    echo "== gpu_suite: exactness, runtimes, decode"
    timeout 215 python3 benchmarks/gpu_suite.py --sections exactness,runtimes,decode \
        --modes eager,cudagraph,channels-last,cudnn-benchmark,compile-ro --budget-s 190 --out "$OUT/decode"
    echo "== bench: compiled (auto), frames kept on the GPU"
    timeout 70 python3 -m flashvaed bench flash-wan2.1 --teacher wan2.1 --runtime compiled "${size[@]}" \
        --frames-on device --repeats 3 --no-diffusers -q --json "$OUT/bench_device.json"
    echo "== bench: torch eager, frames kept on the GPU"
    timeout 70 python3 -m flashvaed bench flash-wan2.1 --teacher wan2.1 --runtime torch "${size[@]}" \
        --frames-on device --repeats 3 --no-diffusers -q --json "$OUT/bench_torch.json"
    echo "== gpu_suite: kernel, fidelity, memory (17 frames)"
    timeout 70 python3 benchmarks/gpu_suite.py --sections kernel,fidelity,memory --frames 17 \
        --budget-s 55 --out "$OUT/small"
    echo "== done"
} 2>&1 | tee "$log"
