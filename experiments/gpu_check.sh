#!/usr/bin/env bash
# GPU benchmark rows of BENCHMARKS.md in one run, inside 8 minutes on one H200.
#
# UNTESTED ON A GPU (no GPU was lent when this was written); every step has
# its own time limit, so a slow step costs its rows, not the rest.
#
# Where the image lacks packages (ott-jax, jaxopt; transformers < 5 and the
# tokenizers / huggingface_hub it pins), they travel as wheels in .whl/
# (gitignored), fetched on a machine with pip access:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#     ott-jax==0.6.0 jaxopt==0.8.5 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
# Run from the repository root: bash experiments/gpu_check.sh [OUT_DIR]
# Outputs (JSON + markdown per step, and the log) go to OUT_DIR (default $OUT or gpu_out).
set -u
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
log="$out/gpu_check.log"
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$log" 2>&1 || { say "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1
"$py" -c "import jax, ott, transformers; print(jax.__version__, jax.devices(), ott.__version__, transformers.__version__)" \
  2>&1 | tee -a "$log" | grep -q "cuda\|Cuda\|gpu" || { say "jax sees no GPU (see $log)"; exit 1; }

step() {  # step NAME SECONDS ARGS...: one bench run with its own limit
  local name=$1 limit=$2; shift 2
  say "start $name (limit ${limit}s)"
  timeout "$limit" "$py" -m experiments.bench "$@" --out="$out/$name.json" \
    --markdown_out="$out/$name.md" >>"$log" 2>&1
  say "end $name rc=$?"
}
# PatchCore vs PatchCore+ end to end, the paper's WRN-50-2 shape, batch 1..256.
step detect_wrn 150 --sections=detect --detect_backbone=wide_resnet50_2 --aggregation=official \
  --batch_sizes=1,8,32,64,128,256 --repeats=5
# The shipped default backbone (EfficientNet-Lite0, simple aggregation).
step detect_lite0 75 --sections=detect --detect_backbone=efficientnet_lite0 --aggregation=simple \
  --batch_sizes=1,8,64,256 --repeats=5
# refine_and_score alone (PatchCore+ and WinCLIP+ shapes).
step refine 90 --sections=refine --batch_sizes=1,64,256,1024 --repeats=5
# WinCLIP vs WinCLIP+ end to end (random-init ViT-B-16-plus-240).
step winclip 120 --sections=winclip --winclip_batch_sizes=1,8,32 --repeats=3
say "done in $(( $(date +%s) - start ))s"
