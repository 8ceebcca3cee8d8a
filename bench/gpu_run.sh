#!/usr/bin/env bash
# The one prepared call for a session lent the GPU machine (issue 16 item 4). First, here:
#
#     bash bench/gpu_wheels.sh                                  # .whl/: the wheels the machine lacks
#
# then the device tool:  run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# In one command, well inside 10 minutes (GPU_RUN_BUDGET seconds, 540 by default, each step under
# `timeout` with what is left): install .whl/ into /tmp/site; bench/gpu.py (plain: full-size SD1.5
# architecture, random weights, fp16, 512², 25 steps DPM++ 2M, CFG 7.5); the random full-size model
# saved once as a diffusers folder (bench/cross_job.py's builder = bench/gpu.py's build_sd15), then
# bench/cross_job.py --embedded --full-size --device cuda (one `farm worker`, one process per GPU,
# SQLite + filesystem broker + file storage, top-up on then off); last, bench/gpu.py --compile (the
# riskiest: max-autotune compiles, batches 1 and 8 only). Into $OUT, at most 8 files: install.log,
# gpu.log, cross_job.log, xj-top-up-worker0.log, xj-without-worker0.log, gpu_compile.log,
# results.jsonl (one JSON line per bench: {"bench": ..., "rc": ..., "result": {...}}), summary.txt.
#
#     GPU_RUN_DRY=1 bash bench/gpu_run.sh      # here, no GPU: the same steps on CPU, tiny model, tiny counts
#
# Knobs: PYTHON (python3), OUT (/tmp/gpu-run-out when unset), GPU_RUN_BUDGET, GPU_SITE (/tmp/site),
# GPU_MODEL_DIR (/tmp/sd15-random, reused when there), GPU_XJ_ARGS (--jobs 64 --submitters 16),
# GPU_COMPILE_ARGS (--compile --batches 8), GPU_WHEELS (.whl; a cp311 set for a dry run with Python 3.11).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-run-out}
DRY=${GPU_RUN_DRY:-0}
SITE=${GPU_SITE:-/tmp/site}
BUDGET=${GPU_RUN_BUDGET:-540}
MODEL_DIR=${GPU_MODEL_DIR:-/tmp/sd15-random}
WHEELS=${GPU_WHEELS:-.whl}
T0=$(date +%s)
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}

left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "gpu_run [$(($(date +%s) - T0)) s] $*"; }

# step NAME LOG SECONDS CMD...: run under `timeout` (no longer than what is left), keep its last JSON line
step() {
  local name=$1 log=$2 want=$3; shift 3
  local have; have=$(($(left) - 10))
  local t=$((want < have ? want : have))
  if [ "$t" -lt 30 ]; then
    say "$name: skipped, ${have} s left"
    printf '{"bench": "%s", "rc": null, "skipped": "out of time"}\n' "$name" >>"$RESULTS"
    return 0
  fi
  say "$name: up to $t s: $*"
  local started; started=$(date +%s)
  timeout -k 30 "$t" "$@" >>"$log" 2>&1
  local rc=$?
  local line; line=$(grep '^{' "$log" | tail -1)
  [ $rc -eq 0 ] || line=""
  printf '{"bench": "%s", "rc": %d, "seconds": %d, "result": %s}\n' "$name" "$rc" "$(($(date +%s) - started))" "${line:-null}" >>"$RESULTS"
  say "$name: rc $rc ($([ $rc -eq 124 ] && echo "timed out after $t s" || echo "done")); log $log"
  [ $rc -eq 0 ] || tail -n 15 "$log"
}

# -- 1. the carried wheels, and the interpreter's view of the stack ---------------------------------------
if [ "$DRY" = 1 ]; then
  DEV=(--device cpu --tiny --images 8 --repeats 1 --batches 1,2)
  XJ=(--device cpu --workers 1 --jobs "${GPU_XJ_JOBS:-16}" --submitters 4 --steps 4)
  COMPILE=(--compile --batches 1)
  MODEL_ARGS=()
else
  DEV=()  # CUDA defaults: full-size SD1.5 architecture, fp16, 512², 25 steps, DPM++ 2M, CFG 7.5
  read -r -a XJ <<<"--device cuda --full-size ${GPU_XJ_ARGS:---jobs 64 --submitters 16}"
  read -r -a COMPILE <<<"${GPU_COMPILE_ARGS:---compile --batches 8}"
  MODEL_ARGS=(--model "$MODEL_DIR")
fi
say "installing $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS into $SITE"
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    >"$OUT/install.log" 2>&1; then
  tail -n 30 "$OUT/install.log"; say "wheel install failed (run bash bench/gpu_wheels.sh here, carry .whl)"; exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# bench/gpu.py starts moto_server from beside the interpreter; --target put it in $SITE/bin
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
[ -e "$BIN/moto_server" ] || ln -s "$SITE/bin/moto_server" "$BIN/moto_server" || say "cannot link $BIN/moto_server"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" - <<'PY'
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
print(", ".join(f"{n} {md.version(n)}" for n in ("diffusers", "transformers", "huggingface_hub", "tokenizers", "accelerate", "peft", "celery", "kombu", "SQLAlchemy", "alembic", "pydantic", "boto3", "moto")))
import farm.client, farm.cli, workers.main, workers.tasks  # noqa: F401  the worker's and the submitter's imports
PY
} >>"$OUT/install.log" 2>&1 || { tail -n 30 "$OUT/install.log"; say "the stack does not import"; exit 1; }
cat "$OUT/install.log" | tail -n 3

# -- 2. bench/gpu.py, plain ---------------------------------------------------------------------------
step gpu "$OUT/gpu.log" 170 "$PY" bench/gpu.py "${DEV[@]}"

# -- 3. the full-size model once, then cross-job batching through real workers -----------------------------
if [ "$DRY" != 1 ]; then
  step build-model "$OUT/cross_job.log" 90 "$PY" bench/cross_job.py --full-size --build-only --device cuda "${MODEL_ARGS[@]}"
fi
# --gpus from torch (not nvidia-smi, which `--gpus all` would need): one worker process per GPU
if [ "$DRY" != 1 ]; then
  XJ+=(--gpus "$("$PY" -c 'import torch; print(",".join(map(str, range(torch.cuda.device_count()))) or "0")')")
fi
# --broker-poll: kombu's filesystem broker otherwise hands a worker ~1 message/s (see bench/cross_job.py)
step cross_job "$OUT/cross_job.log" 220 "$PY" bench/cross_job.py --embedded "${XJ[@]}" "${MODEL_ARGS[@]}" --log-dir "$OUT" \
  --broker-poll 0.05 --ready-timeout 150 --timeout 150

# -- 4. bench/gpu.py --compile (last: compiling may take minutes) -----------------------------------------
step gpu-compile "$OUT/gpu_compile.log" 400 "$PY" bench/gpu.py "${DEV[@]}" "${COMPILE[@]}"

# -- summary ------------------------------------------------------------------------------------------
"$PY" - "$RESULTS" <<'PY' | tee "$OUT/summary.txt"
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    r = row.get("result") or {}
    name, rc = row["bench"], row.get("rc")
    if name in ("gpu", "gpu-compile") and r:
        print(f"{name}: {r['device']} {r['model']} {r['size']}² {r['steps']} steps {r['scheduler']}: farm {r['farm_images_per_s']} images/s "
              f"(batch {r['farm_batch']}), diffusers b1 {r['diffusers_b1_images_per_s']}, best {r['diffusers_best_images_per_s']} "
              f"(b{r['diffusers_best_batch']}): ratio_vs_b1 {r['ratio_vs_b1']}, ratio_vs_best {r['ratio_vs_best']}; "
              f"GPU idle {r['gpu_idle_percent']} %; peak {r['peak_memory_mb']} MB; {r['seconds']} s")
    elif name == "cross_job" and r:
        print(f"cross_job: {r['jobs']} jobs, {r['workers']} worker(s) on {r.get('device')}, {r['size']}² {r['steps']} steps: "
              f"{r['images_per_s']} images/s with top-up against {r['images_per_s_without']} without ({r['speedup']}x), "
              f"mean batch {r['mean_batch']} vs {r['mean_batch_without']}, latency p50 {r['latency_p50_s']} s vs "
              f"{r['latency_p50_s_without']} s; workers ready in {r.get('ready_seconds')} s")
    elif name == "build-model" and r:
        print(f"build-model: {r['model']} in {r['build_seconds']} s")
    else:
        print(f"{name}: rc {rc}{' (timed out)' if rc == 124 else ''}{' ' + row['skipped'] if row.get('skipped') else ''}: no result")
PY
say "done in $(($(date +%s) - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
