#!/usr/bin/env bash
# Install a built momkd artifact into a fresh virtual environment and use it the way a user would,
# without trusting the build tree:
#
#   bash scripts/test_wheel.sh                          # the x86_64 manylinux wheel in dist/
#   bash scripts/test_wheel.sh dist/momkd-X.whl         # a given wheel
#   bash scripts/test_wheel.sh dist/momkd-X.tar.gz      # the sdist (pip builds it; needs Rust)
#
# For a wheel, no Rust toolchain is on PATH (directories holding cargo/rustc/rustup are dropped).
# The commands run from an empty folder outside the repository, with PYTHONPATH unset, and the
# script checks that `momkd` is imported from the new environment. Then:
#   1. plain `pip install ARTIFACT`: `momkd --version` equals the installed metadata and the file
#      name's version, `import momkd._core` works, and the training-only dependencies
#      (scikit-learn, matplotlib) were not pulled in;
#   2. `pip install ARTIFACT[train]`, then synth -> ingest (TRIDENT .h5 -> store) -> info --check
#      -> train one short fold -> predict, checking the outputs.
# PYTHON selects the interpreter for the environment (default python3, >= 3.11); pip's own
# variables (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, ...) pass through. MOMKD_KEEP=1 keeps the folder.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

say() { printf 'test_wheel: %s\n' "$*"; }
die() { printf 'test_wheel: FAILED: %s\n' "$*" >&2; exit 1; }

artifact="${1:-}"
if [ -z "$artifact" ]; then
  # shellcheck disable=SC2012  # newest first; the names are plain
  artifact="$(ls -t "$repo"/dist/momkd-*-manylinux_2_28_x86_64.whl 2>/dev/null | head -n 1 || true)"
  [ -n "$artifact" ] || die "no dist/momkd-*-manylinux_2_28_x86_64.whl; run scripts/build_wheels.sh"
fi
[ -f "$artifact" ] || die "no such file: $artifact"
artifact="$(cd "$(dirname "$artifact")" && pwd)/$(basename "$artifact")"
name="$(basename "$artifact")"
case "$name" in
  *.whl) kind=wheel; expected="$(printf '%s' "$name" | cut -d- -f2)" ;;
  *.tar.gz) kind=sdist; expected="${name#momkd-}"; expected="${expected%.tar.gz}" ;;
  *) die "expected a .whl or .tar.gz, got $name" ;;
esac
PYTHON="$(command -v "$PYTHON")" || die "no interpreter $PYTHON"

work="$(mktemp -d "${TMPDIR:-/tmp}/momkd-test-wheel.XXXXXX")"
if [ "${MOMKD_KEEP:-0}" != 1 ]; then
  trap 'rm -rf "$work"' EXIT
fi
cd "$work"
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
export MOMKD_PROGRESS=0 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$kind" = wheel ]; then
  # Hide every Rust toolchain: keep only PATH entries without cargo, rustc or rustup.
  clean=""
  IFS=: read -r -a dirs <<<"$PATH"
  for d in "${dirs[@]}"; do
    [ -n "$d" ] || continue
    if [ -e "$d/cargo" ] || [ -e "$d/rustc" ] || [ -e "$d/rustup" ]; then continue; fi
    clean="${clean:+$clean:}$d"
  done
  export PATH="$clean"
  unset RUSTC CARGO RUSTUP_TOOLCHAIN
  export CARGO_HOME="$work/no-cargo" RUSTUP_HOME="$work/no-rustup"
  if command -v cargo >/dev/null 2>&1 || command -v rustc >/dev/null 2>&1; then
    die "a Rust toolchain is still on PATH"
  fi
fi

t0=$SECONDS
say "$kind $name (expected version $expected) in $work"
"$PYTHON" -m venv venv
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install --quiet --upgrade pip
"$venv_python" -m pip install --quiet "$artifact"
say "installed in $((SECONDS - t0)) s"

# 1. The plain install: version, extension module, inference-only dependencies.
"$venv_python" - "$expected" "$work/venv" "$repo" <<'EOF'
import importlib.metadata as md
import importlib.util
import pathlib
import sys

expected, venv, repo = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
assert str(repo) not in sys.path and "" not in sys.path[1:], sys.path
import momkd
import momkd._core

where = pathlib.Path(momkd.__file__).resolve()
assert venv.resolve() in where.parents, f"momkd imported from {where}, not from {venv}"
assert pathlib.Path(momkd._core.__file__).resolve().parent == where.parent
assert momkd.__version__ == md.version("momkd") == expected, (momkd.__version__, expected)
for extra_only in ("sklearn", "matplotlib"):
    assert importlib.util.find_spec(extra_only) is None, f"{extra_only} installed without [train]"
print(f"momkd {momkd.__version__} from {where.parent}; _core {pathlib.Path(momkd._core.__file__).name}")
EOF
reported="$("$work/venv/bin/momkd" --version)"
[ "$reported" = "momkd $expected" ] || die "momkd --version says '$reported', expected 'momkd $expected'"
say "momkd --version: $reported"

# 2. Training extras, then the end-to-end path on a tiny synthetic cohort.
t1=$SECONDS
"$venv_python" -m pip install --quiet "${artifact}[train]"
say "installed [train] in $((SECONDS - t1)) s"
export PATH="$work/venv/bin:$PATH"

t2=$SECONDS
momkd synth data --patients 20 --external 0 --dim 32 --genes 20 --patches 10 --seed 3 --h5 -q
momkd ingest data/h5 data/ingested.zarr --quiet >ingest.json
momkd info data/ingested.zarr --check --json >info.json
cat >run.yaml <<EOF
data:
  store: $work/data/ingested.zarr
  clinical: $work/data/clinical.csv
  expression: $work/data/expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
splits: {k: 2}
genomics: {n_genes: 8}
model: {hidden: 8, omics_width: 8, omics_hidden: 8, sphere: 4, memory_k: 2, classifier_hidden: 4}
memory: {init_per_class: 200}
EOF
momkd train --config run.yaml --out run \
  --set train.folds=[0] --set train.epochs=1 --set train.min_epochs=1 --set train.patience=1 \
  >train.log
momkd predict run --store data/ingested.zarr --out preds.csv
say "synth -> ingest -> info -> train (1 fold, 1 epoch) -> predict in $((SECONDS - t2)) s"

"$venv_python" - <<'EOF'
import csv
import json
import math
import pathlib

info = json.loads(pathlib.Path("info.json").read_text())
with open("data/clinical.csv", newline="") as fh:
    slides = {row["slide_id"] for row in csv.DictReader(fh)}
assert info["valid"] and info["checked"] and info["slides_checked"] == len(slides), info
assert info["slides"] == len(slides) and info["feature_dim"] == 32, info
assert pathlib.Path("run/fold_0/best.pt").is_file(), "no fold-0 checkpoint"
assert not pathlib.Path("run/fold_1").exists(), "train.folds=[0] ran more than one fold"
with open("preds.csv", newline="") as fh:
    rows = list(csv.DictReader(fh))
assert {r["slide_id"] for r in rows} == slides, "predictions do not cover the store's slides"
probs = [float(r[k]) for r in rows for k in ("prob_pos_fold0", "prob_pos")]
assert probs and all(0.0 <= p <= 1.0 and math.isfinite(p) for p in probs), probs[:5]
print(f"{len(rows)} slide predictions, {len(probs)} probabilities in [0, 1]")
EOF
say "OK ($kind, $((SECONDS - t0)) s in all)"
