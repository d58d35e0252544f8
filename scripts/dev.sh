#!/usr/bin/env bash
# One-stop set-up and entry point: creates a virtual environment, builds and installs momkd (the Rust
# extension is compiled by maturin), then runs the requested job.
#
#   bash scripts/dev.sh demo [--out DIR]   # the main job: `momkd demo` on the synthetic cohort
#   bash scripts/dev.sh test [PYTEST ARGS] # cargo tests of the Rust core + the pytest suite
#   bash scripts/dev.sh bench [ARGS]       # the pytest-benchmark suites in benches/
#   bash scripts/dev.sh setup              # only create the environment
#
# MOMKD_VENV selects the environment folder (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MOMKD_VENV:-.venv}"
job="${1:-setup}"
shift || true

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# A regular (non-editable) install: the tests run against the built wheel, as users get it.
"$VENV/bin/python" -m pip install --quiet ".[dev]"

case "$job" in
  setup) ;;
  demo)
    exec "$VENV/bin/momkd" demo "$@"
    ;;
  test)
    cargo test --quiet --no-default-features
    # Run from tests/ so that the installed package (not the source tree) is imported.
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
    ;;
  bench)
    exec "$VENV/bin/python" -m pytest benches -o python_files="bench_*.py" -p no:cacheprovider --benchmark-only "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh {setup|demo|test|bench} [args]" >&2
    exit 2
    ;;
esac
