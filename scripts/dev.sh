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

# In CI, keep no copy of the downloaded wheels (torch with its CUDA libraries is several GB): the
# environment is built once, and a full pip cache beside it can exhaust a small disk.
if [ "${CI:-}" = "true" ]; then
  export PIP_NO_CACHE_DIR=1
fi
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
    # The report test renders HTML in headless Chromium; in CI (as root) install it when missing.
    # Without it that one test skips with a reason.
    if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed" >&2
    fi
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
