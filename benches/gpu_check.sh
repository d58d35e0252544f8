#!/usr/bin/env bash
# One prepared GPU check of momkd's Triton kernels, for a machine with a CUDA GPU and the repository
# checked out. It
#   1. picks a Python that has CUDA PyTorch and Triton ($PYTHON, else the repo's .venv, else a venv
#      over python3's site packages at $MOMKD_GPU_VENV, default /tmp/momkd-gpu-venv) and makes
#      momkd importable (editable install, a wheel in dist/, or a prebuilt python/momkd/_core*.so
#      on PYTHONPATH: no network needed);
#   2. runs the GPU tests of the whole suite (pytest -m gpu) and the kernel test grid compiled on the
#      GPU (tests/test_kernels.py);
#   3. runs the kernel benchmarks (benches/bench_kernels.py: fused vs eager vs torch.compile);
#   4. trains MoMKD on the demo cohort for two epochs on CUDA (kernels auto, device cohort cache,
#      float16 hand-off) and writes $OUT/demo_epoch.json: epoch time and loader-wait share per
#      epoch (epoch 1 reads the store and fills the cache, epoch 2 is served from GPU memory);
#   5. writes $OUT/kernels_results.json (environment, test counts, every benchmark, the ratios) and
#      $OUT/kernels_ratios.txt (the ratio table and the docs/METHOD.md §5 check), plus the raw logs.
#
# Usage: benches/gpu_check.sh [--quick]
#   --quick   N in {10k, 50k}, K = 16, 10 rounds (a few minutes less)
# Env: OUT (default ./gpu_results), PYTHON, MOMKD_BENCH_N / _K / _COMPILE / _ROUNDS (see the
#      benchmark module), MOMKD_SKIP_TESTS=1 (benchmarks only).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-./gpu_results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ "${1:-}" == "--quick" ]]; then
  export MOMKD_BENCH_N="${MOMKD_BENCH_N:-10000,50000}"
  export MOMKD_BENCH_K="${MOMKD_BENCH_K:-16}"
  export MOMKD_BENCH_ROUNDS="${MOMKD_BENCH_ROUNDS:-10}"
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET MOMKD_FORCE_EAGER

log() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }
: >"$OUT/gpu_check.log"

has_cuda_torch() {
  "$1" -c 'import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

# 1. interpreter ---------------------------------------------------------------------------------
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && has_cuda_torch .venv/bin/python; then
    PY=.venv/bin/python
  else
    VENV="${MOMKD_GPU_VENV:-${TMPDIR:-/tmp}/momkd-gpu-venv}"
    if [[ ! -x "$VENV/bin/python" ]]; then
      log "creating $VENV over python3's site packages"
      python3 -m venv --system-site-packages "$VENV"
    fi
    PY="$VENV/bin/python"
  fi
fi
if ! has_cuda_torch "$PY"; then
  log "FATAL: $PY has no CUDA-enabled torch + triton"
  exit 1
fi
log "python: $PY"

if ! "$PY" -c 'import momkd._core' 2>/dev/null; then
  if "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$OUT/gpu_check.log" 2>&1; then
    log "installed momkd (editable)"
  elif compgen -G "dist/momkd-*.whl" >/dev/null; then
    "$PY" -m pip install --no-deps --force-reinstall dist/momkd-*.whl >>"$OUT/gpu_check.log" 2>&1
    log "installed momkd from dist/"
  elif compgen -G "python/momkd/_core*.so" >/dev/null; then
    export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
    log "using the prebuilt extension in python/momkd via PYTHONPATH"
  fi
fi
if ! "$PY" -c 'import momkd.kernels.memory_attention, momkd.kernels.align_momentum' 2>>"$OUT/gpu_check.log"; then
  log "FATAL: momkd is not importable (build it, or bring dist/*.whl or python/momkd/_core*.so)"
  exit 1
fi

"$PY" - >"$OUT/env.json" <<'EOF'
import json, platform, subprocess
import torch, triton
info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except Exception as exc:  # nvidia-smi is optional
    info["nvidia_smi"] = repr(exc)
print(json.dumps(info))
EOF
log "env: $(cat "$OUT/env.json")"

# 1b. ahead-of-time compile report ----------------------------------------------------------------
# First, so that the first GPU also confirms what benches/kernel_aot.py reports without one: every
# kernel compiles for this and the other architectures, with registers, spills and tensor cores.
log "ahead-of-time kernel report (benches/kernel_aot.py --grid presets)"
"$PY" benches/kernel_aot.py --grid presets --json "$OUT/kernel_aot.json" \
  --markdown "$OUT/kernel_aot.md" >"$OUT/kernel_aot.log" 2>&1
log "  exit $?: $(tail -n 1 "$OUT/kernel_aot.log")"

# 2. tests ---------------------------------------------------------------------------------------
if [[ "${MOMKD_SKIP_TESTS:-0}" != "1" ]]; then
  log "pytest -m gpu tests"
  "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml" \
    >"$OUT/tests.log" 2>&1
  log "  exit $?: $(tail -n 1 "$OUT/tests.log")"
  log "pytest tests/test_kernels.py (compiled kernel grid)"
  "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider -m "not gpu" \
    --junitxml="$OUT/tests_kernels.xml" >>"$OUT/tests.log" 2>&1
  log "  exit $?: $(tail -n 1 "$OUT/tests.log")"
fi

# 3. benchmarks ----------------------------------------------------------------------------------
log "benchmarks (N=${MOMKD_BENCH_N:-default} K=${MOMKD_BENCH_K:-default})"
"$PY" -m pytest benches/bench_kernels.py -q -p no:cacheprovider --benchmark-json="$OUT/bench_raw.json" \
  --benchmark-columns=median,iqr,rounds >"$OUT/bench.log" 2>&1
log "  exit $?: $(tail -n 1 "$OUT/bench.log")"

# 3b. one demo-cohort training epoch on CUDA ------------------------------------------------------
# The figures that matter on a GPU: with the model step in milliseconds, the loader decides the
# epoch time. MoMKD on the demo cohort, kernels auto, the device cohort cache and the float16
# hand-off; epoch 1 reads the store (and fills the cache), epoch 2 is served from GPU memory.
log "demo-cohort training epochs (kernels auto, data.cache=device, train.feature_dtype=float16)"
"$PY" - "$OUT" >"$OUT/demo_epoch.log" 2>&1 <<'EOF'
import json, sys, time
from pathlib import Path

from momkd.config import load_config, preset_yaml
from momkd.demo import DEFAULT
from momkd.synth import generate_cohort
from momkd.train.runner import train

out = Path(sys.argv[1]) / "demo_epoch"
data = out / "data"
if not (data / "cohort.zarr" / "zarr.json").exists():
    generate_cohort(data, patients=DEFAULT.patients, external=0, dim=DEFAULT.dim,
                    genes=DEFAULT.genes, patches=DEFAULT.patches, seed=0, progress=False,
                    overwrite=True)
(data / "run.yaml").write_text(preset_yaml("demo"), encoding="utf-8")
sets = [f"data.store={data / 'cohort.zarr'}", *DEFAULT.overrides, "model.method=momkd",
        "train.kernels=auto", "train.device=cuda", "data.cache=device",
        "train.feature_dtype=float16", "train.epochs=2", "train.min_epochs=2", "train.folds=[0]"]
cfg = load_config(data / "run.yaml", overrides=sets)
t0 = time.perf_counter()
train(cfg, out_dir=out / "run", progress=False)
hist = json.loads((out / "run" / "fold_0" / "history.json").read_text())
rows = [{"epoch": i + 1, "train_seconds": h.get("train_seconds"),
         "loader_wait_share": h.get("loader_wait_share")} for i, h in enumerate(hist)]
result = {"epochs": rows, "total_seconds": time.perf_counter() - t0, "overrides": sets}
(out.parent / "demo_epoch.json").write_text(json.dumps(result, indent=1))
for r in rows:
    print(f"epoch {r['epoch']}: {r['train_seconds']:.2f} s, loader wait {r['loader_wait_share']:.1%}")
EOF
log "  exit $?: $(tail -n 2 "$OUT/demo_epoch.log" | tr '\n' ' ')"
# 3c. data-parallel training (torchrun) ------------------------------------------------------------
# With >= 2 GPUs: epoch time of 1 vs 2 processes on CUDA (nccl), benches/bench_ddp.py. With one GPU
# (nccl allows one rank per device): a 1-process torchrun training on the GPU and the 2-process gloo
# comparison on the CPU. MOMKD_SKIP_DDP=1 skips this step.
if [[ "${MOMKD_SKIP_DDP:-0}" != "1" ]]; then
  NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
  if [[ "$NGPU" -ge 2 ]]; then
    log "DDP benchmark on CUDA (nccl, 1 vs 2 processes)"
    MOMKD_BENCH_DEVICE=cuda "$PY" -m pytest benches/bench_ddp.py -q -s -p no:cacheprovider \
      --benchmark-json="$OUT/bench_ddp_cuda.json" >"$OUT/ddp.log" 2>&1
  else
    log "one GPU: torchrun smoke run on cuda:0, then the DDP benchmark on the CPU (gloo)"
    MOMKD_BENCH_DEVICE=cuda "$PY" -m pytest benches/bench_ddp.py -q -s -p no:cacheprovider \
      -k "procs1" --benchmark-json="$OUT/bench_ddp_cuda1.json" >"$OUT/ddp.log" 2>&1
    MOMKD_BENCH_DEVICE=cpu "$PY" -m pytest benches/bench_ddp.py -q -s -p no:cacheprovider \
      --benchmark-json="$OUT/bench_ddp_cpu.json" >>"$OUT/ddp.log" 2>&1
  fi
  log "  exit $?: $(grep -h 'efficiency' "$OUT/ddp.log" | tail -n 1)"
fi

# 4. summary -------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
result = {"env": json.load(open(os.path.join(out, "env.json")))}
tests = {}
for name in ("tests_gpu.xml", "tests_kernels.xml"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        tests[name] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        tests[name]["failed"] = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
result["tests"] = tests

rows, benches = {}, []
raw = os.path.join(out, "bench_raw.json")
if os.path.exists(raw):
    for b in json.load(open(raw))["benchmarks"]:
        info = b["extra_info"]
        entry = {"group": b["group"], **info, "median_ms": b["stats"]["median"] * 1e3,
                 "iqr_ms": b["stats"]["iqr"] * 1e3, "rounds": b["stats"]["rounds"]}
        benches.append(entry)
        rows.setdefault((info["mode"], info["n"], info["k"]), {})[info["impl"]] = entry
result["benchmarks"] = benches

lines = [f"{'mode':7} {'N':>7} {'K':>3} {'fused ms':>9} {'eager ms':>9} {'compiled ms':>11} "
         f"{'eager/fused':>11} {'comp/fused':>10} {'fused MiB':>10} {'eager MiB':>10} {'mem e/f':>8}"]
ratios = []
for (mode, n, k), impls in sorted(rows.items()):
    fused, eager, comp = impls.get("fused"), impls.get("eager"), impls.get("compiled")
    if fused is None or eager is None:
        continue
    r = {"mode": mode, "n": n, "k": k,
         "speedup_vs_eager": eager["median_ms"] / fused["median_ms"],
         "speedup_vs_compiled": comp["median_ms"] / fused["median_ms"] if comp else None,
         "peak_mem_ratio_eager_over_fused": eager["peak_mem_mib"] / max(fused["peak_mem_mib"], 1e-9)}
    ratios.append(r)
    comp_ms = f"{comp['median_ms']:11.3f}" if comp else f"{'-':>11}"
    comp_r = f"{r['speedup_vs_compiled']:10.2f}" if comp else f"{'-':>10}"
    lines.append(f"{mode:7} {n:7d} {k:3d} {fused['median_ms']:9.3f} {eager['median_ms']:9.3f} {comp_ms} "
                 f"{r['speedup_vs_eager']:11.2f} {comp_r} {fused['peak_mem_mib']:10.1f} "
                 f"{eager['peak_mem_mib']:10.1f} {r['peak_mem_ratio_eager_over_fused']:8.2f}")
result["ratios"] = ratios

target = next((r for r in ratios if (r["mode"], r["n"], r["k"]) == ("fwdbwd", 50000, 16)), None)
if target is None:
    verdict = "docs/METHOD.md §5 kernel target: not measured (needs fwdbwd N=50000 K=16)"
else:
    ok = target["speedup_vs_eager"] >= 3.0 and target["peak_mem_ratio_eager_over_fused"] > 1.0
    verdict = (f"docs/METHOD.md §5 kernel target (fwd+bwd, P=50000, K=16, S=64, H=512: >= 3x eager, lower peak "
               f"memory): {'PASS' if ok else 'FAIL'} (speed-up {target['speedup_vs_eager']:.2f}x, "
               f"peak memory eager/fused {target['peak_mem_ratio_eager_over_fused']:.2f})")
result["spec_target"] = verdict
test_lines = [f"{name}: {t['tests']} tests, {t['failures']} failures, {t['errors']} errors, "
              f"{t['skipped']} skipped" + (f"; failed: {', '.join(t['failed'])}" if t["failed"] else "")
              for name, t in tests.items()]
table = "\n".join([f"device: {result['env'].get('device')}  torch {result['env'].get('torch')}  "
                   f"triton {result['env'].get('triton')}", *test_lines, "", *lines, "", verdict])
result["table"] = table
json.dump(result, open(os.path.join(out, "kernels_results.json"), "w"), indent=1)
open(os.path.join(out, "kernels_ratios.txt"), "w").write(table + "\n")
print(table)
EOF
rm -f "$OUT/env.json"
log "results: $OUT/kernels_results.json, $OUT/kernels_ratios.txt"
