#!/usr/bin/env bash
# Every GPU check in one go, Ray-free and DeepSpeed-free (what a bare CUDA box with torch can run):
#
#   bash tests/benchmarks/gpu_all.sh PKG REF OUTDIR
#
# PKG: a trained model package (the quick demo's OUT/runs/dit/package); REF: its CPU reference,
# made beforehand on a machine with the package's text encoder:
#   .venv/bin/python tests/benchmarks/gpu_check.py reference --package PKG --out REF
# Writes OUTDIR/{check,dit,dit_nockpt,lora,vae}.json and OUTDIR/log.txt; each step has its own
# time limit (540 s in all) and a failed step does not stop the others (the exit status is
# the worst one).
set -u
pkg=$1 ref=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: rc $rc"
    [ $rc -gt $status ] && status=$rc
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    step 100 check python3 "$here/gpu_check.py" check --package "$pkg" --ref "$ref" \
        --out "$out/check.json"
    step 120 dit python3 "$here/gpu_bench_dit.py" --out "$out/dit.json"
    step 80 dit_nockpt python3 "$here/gpu_bench_dit.py" --latent 21x30x52 --no-checkpointing \
        --out "$out/dit_nockpt.json"
    step 150 lora python3 "$here/gpu_bench_lora.py" --out "$out/lora.json"
    step 90 vae python3 "$here/gpu_check.py" vae-scale --out "$out/vae.json"
    exit $status
} 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
