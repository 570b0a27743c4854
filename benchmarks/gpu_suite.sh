#!/usr/bin/env bash
# One command for a GPU machine: device limits (native probe) → every benchmark → one run JSON → SUMMARY.md.
#
#   bash benchmarks/gpu_suite.sh            # from anywhere; runs in the project root
#
# Installs nothing it cannot find offline: DALI only from wheels already on the machine
# (/root/dali/*.whl, or the parts /root/dali/dali.part-* or .gpu-carry/dali.part-* written by
# /work/shared/gpu/pack-dali.sh), with pip --no-index; otherwise the benchmarks run without DALI
# (its cases skip). Runs from the source tree with the machine's own torch (PYTHONPATH=.).
#
# Writes under RESULTS (default benchmarks/results/):
#   device_limits.json                     the native probe's JSON (benchmarks/device_limits.py reads it)
#   run-<UTC time>-<short commit>.json     device, driver, versions, commit, command, limits, pytest-benchmark
#   SUMMARY.md                             newest run vs the targets and vs the previous run
#   history/                               pytest-benchmark --benchmark-save storage (--benchmark-compare)
#   logs/<stamp>/                          build, probe, DALI install and pytest logs
# and, when $OUT is set (the device runner's output folder), copies all of it to $OUT/results/.
#
# Environment: PYTHON (default python3), RESULTS, CUDA_ARCH (default: the GPU's compute capability via
# nvidia-smi, else 90), LT_GIT_COMMIT / LT_GIT_DIRTY (when the tree has no .git), BENCH_ARGS (extra
# pytest arguments, e.g. "-k fused_head"). Exit status: pytest's (0 = every benchmark passed), or 1
# when the run JSON could not be written.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGS="$RESULTS/logs/$STAMP"
TMP=$(mktemp -d)
mkdir -p "$LOGS"
log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$LOGS/suite.log"; }
COMMAND="bash benchmarks/gpu_suite.sh${BENCH_ARGS:+ (BENCH_ARGS=$BENCH_ARGS)}"

if [ -z "${LT_GIT_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  LT_GIT_COMMIT=$(git rev-parse HEAD)
  if [ -z "${LT_GIT_DIRTY:-}" ]; then
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then LT_GIT_DIRTY=1; else LT_GIT_DIRTY=0; fi
  fi
fi
export LT_GIT_COMMIT=${LT_GIT_COMMIT:-} LT_GIT_DIRTY=${LT_GIT_DIRTY:-}
SHORT=${LT_GIT_COMMIT:0:7}
log "project $ROOT, commit ${LT_GIT_COMMIT:-unknown}, python $($PY -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 | tee -a "$LOGS/suite.log"

# ---------------------------------------------------------------- DALI from offline wheels, if any
install_dali() {
  if $PY -c "import nvidia.dali" >/dev/null 2>&1; then
    log "DALI already importable: $($PY -c 'import nvidia.dali as d; print(d.__version__)')"
    return 0
  fi
  local wheels="$TMP/dali-wheels"
  mkdir -p "$wheels"
  if compgen -G "/root/dali/*.whl" >/dev/null; then
    cp /root/dali/*.whl "$wheels"/
  elif compgen -G "/root/dali/dali.part-*" >/dev/null; then
    cat /root/dali/dali.part-* | tar -C "$wheels" -xf - || { log "DALI: /root/dali parts do not untar"; return 1; }
  elif compgen -G ".gpu-carry/dali.part-*" >/dev/null; then
    cat .gpu-carry/dali.part-* | tar -C "$wheels" -xf - || { log "DALI: .gpu-carry parts do not untar"; return 1; }
  else
    log "DALI: no wheels (/root/dali/*.whl, /root/dali/dali.part-*, .gpu-carry/dali.part-*): running without DALI"
    return 1
  fi
  log "DALI: installing $(ls "$wheels" | wc -l) wheel(s) with pip --no-index into $TMP/site"
  if ! $PY -m pip install -q --no-index --no-deps --target "$TMP/site" "$wheels"/*.whl >"$LOGS/dali-install.log" 2>&1; then
    log "DALI: pip install failed (see logs/$STAMP/dali-install.log): running without DALI"
    return 1
  fi
  export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
  if $PY -c "import nvidia.dali, nvidia.dali.plugin.pytorch" >>"$LOGS/dali-install.log" 2>&1; then
    log "DALI: $($PY -c 'import nvidia.dali as d; print(d.__version__)') importable"
  else
    log "DALI: installed but does not import (see logs/$STAMP/dali-install.log): running without DALI"
    return 1
  fi
}
install_dali || true

# ---------------------------------------------------------------- native probe: build, run
if [ -z "${CUDA_ARCH:-}" ]; then
  CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
  CUDA_ARCH=${CUDA_ARCH:-90}
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
LIMITS="$RESULTS/device_limits.json"
rm -f "$LIMITS"  # never divide by a stale file: this run measures its own
unset LT_DEVICE_LIMITS
t0=$(date +%s)
if cmake -S . -B build/native "${GEN[@]}" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" >"$LOGS/probe-build.log" 2>&1 \
   && cmake --build build/native -j "$(nproc)" >>"$LOGS/probe-build.log" 2>&1; then
  log "probe built for sm_$CUDA_ARCH in $(( $(date +%s) - t0 )) s"
  build/native/device_limits >"$TMP/limits.json" 2>"$LOGS/probe.stderr"
  rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ]; then
    cp "$TMP/limits.json" "$LIMITS"
    export LT_DEVICE_LIMITS="$LIMITS"
    log "probe (exit $rc): $(cat "$LIMITS")"
  else
    log "probe failed (exit $rc): $(cat "$TMP/limits.json" "$LOGS/probe.stderr"); benchmarks measure limits with torch"
  fi
else
  log "probe build failed (see logs/$STAMP/probe-build.log); benchmarks measure limits with torch"
fi

# ---------------------------------------------------------------- the benchmark suite
HISTORY="$RESULTS/history"
COMPARE=()
if compgen -G "$HISTORY/*/*.json" >/dev/null; then COMPARE=(--benchmark-compare); fi
log "pytest benchmarks (history: $HISTORY${COMPARE:+, comparing with its newest save})"
# shellcheck disable=SC2086
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" $PY -m pytest benchmarks -p no:cacheprovider -q -rs \
  --benchmark-json="$TMP/bench.json" --junitxml="$TMP/junit.xml" \
  --benchmark-save="${STAMP}_${SHORT:-nocommit}" --benchmark-storage="file://$HISTORY" \
  "${COMPARE[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/pytest.log"
PYTEST_RC=${PIPESTATUS[0]}
log "pytest exit $PYTEST_RC"

# ---------------------------------------------------------------- run JSON + summary
STATUS=$PYTEST_RC
LIMIT_ARGS=()
[ -f "$LIMITS" ] && LIMIT_ARGS=(--limits "$LIMITS")
if RUN_JSON=$(PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" $PY benchmarks/summarize.py "$RESULTS" --record \
      --benchmark-json "$TMP/bench.json" --junit "$TMP/junit.xml" "${LIMIT_ARGS[@]}" \
      --command "$COMMAND" --pytest-rc "$PYTEST_RC" 2>>"$LOGS/suite.log"); then
  log "run JSON: $RUN_JSON"
  $PY benchmarks/summarize.py "$RESULTS" --out "$RESULTS/SUMMARY.md" 2>>"$LOGS/suite.log" \
    && log "summary: $RESULTS/SUMMARY.md" || { log "summary failed"; STATUS=1; }
else
  log "writing the run JSON failed (see logs/$STAMP/suite.log)"
  STATUS=1
fi

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp -r "$RESULTS"/. "$OUT/results/" && log "copied $RESULTS to $OUT/results"
fi
rm -rf "$TMP"
exit "$STATUS"
