#!/usr/bin/env bash
# Build the release artifacts into dist/ and check them:
#
#   * momkd-<version>-cp311-abi3-manylinux_2_28_x86_64.whl
#   * momkd-<version>-cp311-abi3-manylinux_2_28_aarch64.whl (cross-compiled with zig, no container)
#   * momkd-<version>.tar.gz (the sdist)
#
# The Linux wheels are linked by `zig cc` against glibc 2.28 (`maturin --zig`), so they install on
# any Linux with glibc >= 2.28 and Python >= 3.11 (one abi3 wheel per architecture). Every artifact
# must pass `twine check`, and `auditwheel show` must report manylinux_2_28 for each wheel.
#
#   bash scripts/build_wheels.sh                       # everything
#   MOMKD_TARGETS="x86_64 sdist" bash scripts/build_wheels.sh   # a subset of x86_64 aarch64 sdist
#
# Needs Python >= 3.11 and a Rust toolchain. The build tools (maturin, ziglang, twine, auditwheel)
# are installed into their own environment, MOMKD_BUILD_VENV (default .venv-build). The aarch64
# wheel also needs the Rust standard library for aarch64-unknown-linux-gnu
# (`rustup target add aarch64-unknown-linux-gnu`, or RUSTC pointing at any rustc >= 1.91 whose
# sysroot has it); without it that wheel is skipped with a message, or the script fails when
# MOMKD_REQUIRE_ALL=1. CARGO_TARGET_DIR is honoured (cross builds land in <dir>/<triple>/).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_VENV="${MOMKD_BUILD_VENV:-.venv-build}"
TARGETS="${MOMKD_TARGETS:-x86_64 aarch64 sdist}"
OUT="${MOMKD_DIST:-dist}"
PYTHON="${PYTHON:-python3}"

say() { printf 'build_wheels: %s\n' "$*"; }
die() { printf 'build_wheels: error: %s\n' "$*" >&2; exit 1; }

version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)"
[ -n "$version" ] || die "no version in Cargo.toml"

if [ ! -x "$BUILD_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$BUILD_VENV"
fi
"$BUILD_VENV/bin/python" -m pip install --quiet --upgrade pip
"$BUILD_VENV/bin/python" -m pip install --quiet \
  "maturin>=1.9.4,<2" "ziglang>=0.13,<0.18" "twine>=6.1" "auditwheel>=6.1"
# maturin finds zig through the interpreter it runs under (`python -m ziglang`).
PATH="$(cd "$BUILD_VENV/bin" && pwd):$PATH"
export PATH

mkdir -p "$OUT"

has_std() {
  # True when the active rustc has a standard library for the target triple $1.
  local libdir
  libdir="$("${RUSTC:-rustc}" --print target-libdir --target "$1" 2>/dev/null)" || return 1
  compgen -G "$libdir/libstd-*.rlib" >/dev/null
}

built=()
skipped=()

build_linux_wheel() {
  local arch="$1" triple="$1-unknown-linux-gnu"
  if ! has_std "$triple"; then
    local why="no Rust standard library for $triple (rustup target add $triple)"
    [ "${MOMKD_REQUIRE_ALL:-0}" = 1 ] && die "$why"
    say "SKIPPED the $arch wheel: $why"
    skipped+=("$arch")
    return 0
  fi
  say "building the manylinux_2_28 $arch wheel"
  rm -f "$OUT/momkd-$version-cp311-abi3-manylinux_2_28_$arch.whl"
  maturin build --release --locked --zig --compatibility manylinux_2_28 \
    --target "$triple" --out "$OUT"
  local wheel
  wheel="$OUT/momkd-$version-cp311-abi3-manylinux_2_28_$arch.whl"
  [ -f "$wheel" ] || die "maturin did not write $wheel"
  # auditwheel inspects the ELF files inside the wheel: every versioned glibc symbol and every
  # linked library must be allowed by the manylinux_2_28 policy.
  auditwheel show "$wheel" | tee "$OUT/auditwheel-$arch.txt"
  grep -q "manylinux_2_28_$arch" "$OUT/auditwheel-$arch.txt" \
    || die "auditwheel does not report manylinux_2_28_$arch for $wheel"
  built+=("$wheel")
}

for target in $TARGETS; do
  case "$target" in
    x86_64 | aarch64) build_linux_wheel "$target" ;;
    sdist)
      say "building the sdist"
      rm -f "$OUT/momkd-$version.tar.gz"
      maturin sdist --out "$OUT"
      built+=("$OUT/momkd-$version.tar.gz")
      ;;
    *) die "unknown target '$target' in MOMKD_TARGETS (x86_64, aarch64, sdist)" ;;
  esac
done

[ "${#built[@]}" -gt 0 ] || die "nothing was built"
twine check --strict "${built[@]}"
say "built ${built[*]}"
if [ "${#skipped[@]}" -gt 0 ]; then
  say "skipped: ${skipped[*]} (see the messages above)"
fi
