"""Ahead-of-time compile report of momkd's Triton kernels, without a GPU.

Every launch configuration is taken from the launchers themselves: the public fused functions of
:mod:`momkd.kernels.memory_attention` and :mod:`momkd.kernels.align_momentum` run forward and
backward on CPU tensors over a shape grid while each kernel's ``kernel[grid](...)`` is intercepted
and recorded instead of launched. Each recorded launch is bound with Triton's own argument
specialisation for a CUDA target, compiled with ``triton.compile(ASTSource(...), target=GPUTarget(
"cuda", cc, 32))`` and its PTX assembled again with the bundled ``ptxas -v`` (the flags Triton uses),
which reports registers and spill bytes per thread. Shared memory comes from the compiled kernel's
metadata; a tensor-core instruction (``mma``, ``wgmma``, ``tcgen05.mma``) in the PTX marks tensor
cores.

Shape grid (docs/ARCHITECTURE.md, "Kernels"): P in {1, 100, 4096, 20000} patches per bag, K in
{4, 16, 64}, S in {64, 128}, D (= hidden H) in {256, 512}, B in {1, 8} bags, fp32 and fp16 inputs.
Preset points: the official, paper and demo presets' S and H with K in {4, 16, 64}, P = 4096, B = 8.

Usage::

    python benches/kernel_aot.py [--grid presets|full|all] [--arch 80,90] [--precision ieee,tf32]
                                 [--json FILE] [--markdown FILE]

Runs with ``TRITON_INTERPRET`` unset (the kernels must be decorated for compilation); exits 1 when a
compile fails or, with ``--require-no-spills``, when a preset configuration spills.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from momkd import kernels  # noqa: E402
from momkd.kernels import align_momentum as am  # noqa: E402
from momkd.kernels import memory_attention as ma  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

MODULES = (ma, am)
DEFAULT_ARCHS = (80, 90)
EXTRA_ARCHS = (89, 100, 120)
GRID_P = (1, 100, 4096, 20000)
GRID_K = (4, 16, 64)
GRID_S = (64, 128)
GRID_D = (256, 512)
GRID_B = (1, 8)
GRID_DTYPES = ("float32", "float16")
PRESET_K = (4, 16, 64)
_TC = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async|tcgen05\.mma)\b")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class Point:
    """One shape of the grid: B bags of P patches, memories (K, S), features of width D."""

    P: int
    K: int
    S: int
    D: int
    B: int
    dtype: str
    precision: str
    preset: str | None = None


def preset_shapes() -> dict[str, tuple[int, int]]:
    """(S, H) of the ``official``, ``paper`` and ``demo`` presets, read from :mod:`momkd.config`."""
    import yaml
    from momkd.config import PRESETS, preset_yaml

    shapes = {
        name: (int(PRESETS[name]["model.sphere"]), int(PRESETS[name]["model.hidden"]))
        for name in ("official", "paper")
    }
    demo = yaml.safe_load(preset_yaml("demo"))["model"]
    shapes["demo"] = (int(demo["sphere"]), int(demo["hidden"]))
    return shapes


def grid_points(which: str, precisions: tuple[str, ...]) -> list[Point]:
    points: list[Point] = []
    if which in ("presets", "all"):
        for name, (s, h) in preset_shapes().items():
            for k, dtype, prec in itertools.product(PRESET_K, GRID_DTYPES, precisions):
                points.append(Point(4096, k, s, h, 8, dtype, prec, name))
    if which in ("full", "all"):
        for p, k, s, d, b, dtype in itertools.product(
            GRID_P, GRID_K, GRID_S, GRID_D, GRID_B, GRID_DTYPES
        ):
            for prec in precisions:
                points.append(Point(p, k, s, d, b, dtype, prec))
    return points


# ------------------------------------------------------------------------------- launch capture


@dataclass
class Launch:
    kernel: Any  # triton JITFunction
    grid: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args)`` records instead of running."""

    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel = kernel
        self.sink = sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.kernel, grid, args, kwargs))

        return launch


def kernel_names() -> list[tuple[Any, str]]:
    """Every launched kernel (module attribute ``_..._kernel`` that is a Triton JIT function)."""
    found = []
    for module in MODULES:
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction):
                found.append((module, name))
    return found


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    sink: list[Launch] = []
    with contextlib.ExitStack() as stack:
        for module, name in kernel_names():
            stack.enter_context(
                mock.patch.object(module, name, _Recorder(getattr(module, name), sink))
            )
        yield sink


def drive(pt: Point) -> list[Launch]:
    """Run every fused op forward and backward at ``pt`` on CPU tensors and return the launches."""
    dtype = getattr(torch, pt.dtype)
    n = pt.P * pt.B
    off = torch.arange(pt.B + 1, dtype=torch.int64) * pt.P
    labels = torch.arange(pt.B, dtype=torch.int64) % 2
    mem = torch.nn.functional.normalize(torch.randn(pt.K, pt.S), dim=1)
    log_tau = torch.zeros(())
    with capture() as launches, kernels.kernel_precision(pt.precision):
        p = torch.zeros(n, pt.S, dtype=dtype, requires_grad=True)
        f = torch.zeros(n, pt.D, dtype=dtype, requires_grad=True)
        out = ma.memory_attention_pool(p, f, mem, mem, log_tau, off)
        torch.autograd.backward(out[:3], [torch.ones_like(t) for t in out[:3]])
        outc = ma.memory_attention_pool_commit(p, f, mem, mem, log_tau, off, mem, mem, labels)
        torch.autograd.backward(
            [outc[0], outc[5]], [torch.ones_like(outc[0]), torch.ones_like(outc[5])]
        )
        ma.batched_commitment_loss(p, mem, mem, labels, off).backward()
        del p, f, out, outc
        z = torch.zeros(pt.B, pt.S, dtype=dtype, requires_grad=True)
        c_pos = mem.clone().requires_grad_(True)
        c_neg = mem.clone().requires_grad_(True)
        am.align_loss(z, labels, c_pos, c_neg).sum().backward()
        mems = torch.stack([mem, mem])
        sums, counts = am.momentum_stats(mems, z.detach(), labels)
        am.momentum_apply(mems, sums, counts, 0.9)
        pos, neg = mem.clone(), mem.clone()
        unused = torch.zeros(2, pt.K, dtype=torch.int64)
        recent = torch.zeros(2, 64, pt.S)
        count = torch.zeros(2, dtype=torch.int64)
        am.momentum_step(pos, neg, unused, recent, count, z.detach(), labels, 0.9, 10)
    return launches


# ------------------------------------------------------------------------------------ compiling


@dataclass
class Compiled:
    ok: bool
    registers: int | None = None
    spill_bytes: int | None = None
    spill_load_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_cores: bool | None = None
    error: str | None = None


def _bind(launch: Launch, target: GPUTarget) -> tuple[dict[str, Any], ...]:
    """Triton's own specialisation of a launch for ``target``: signature, constexprs, attrs,
    options (as ``JITFunction.run`` computes them before compiling)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kern = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kern._pack_args(
        backend, dict(launch.kwargs), bound, spec, opts
    )
    return signature, constexprs, attrs, options.__dict__


def _ptxas_report(ptx: str, cc: int) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(cc)}", str(src), "-o", str(src) + ".o"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    regs, spill = _REGS.search(proc.stderr), _SPILL.search(proc.stderr)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output: {proc.stderr[-500:]}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def compile_launch(launch: Launch, cc: int) -> tuple[dict[str, Any], Compiled]:
    target = GPUTarget("cuda", cc, 32)
    try:
        signature, constexprs, attrs, options = _bind(launch, target)
    except Exception as exc:  # noqa: BLE001 - reported per configuration
        return {}, Compiled(ok=False, error=f"bind: {type(exc).__name__}: {exc}")
    config = describe(launch, signature, constexprs, options, attrs)
    try:
        ck = triton.compile(
            ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=target,
            options=options,
        )
        ptx = ck.asm["ptx"]
        regs, stores, loads = _ptxas_report(ptx, cc)
    except Exception as exc:  # noqa: BLE001 - reported per configuration
        return config, Compiled(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    return config, Compiled(
        ok=True,
        registers=regs,
        spill_bytes=stores,
        spill_load_bytes=loads,
        shared_bytes=int(ck.metadata.shared),
        tensor_cores=bool(_TC.search(ptx)),
    )


def describe(
    launch: Launch,
    signature: dict[Any, Any],
    constexprs: dict[Any, Any],
    options: dict[str, Any],
    attrs: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """The launch configuration: constexprs, warps, stages, the pointer element types and the
    arguments Triton specialises as divisible by 16."""
    names = launch.kernel.arg_names
    consts = {names[path[0]]: _plain(v) for path, v in constexprs.items() if len(path) == 1}
    aligned = sorted(
        names[path[0]] for path, a in (attrs or {}).items() if "tt.divisibility" in str(a)
    )
    pointers = {k: v for k, v in signature.items() if isinstance(v, str) and v.startswith("*")}
    return {
        "constexprs": {k: consts[k] for k in names if k in consts},
        "num_warps": options.get("num_warps"),
        "num_stages": options.get("num_stages"),
        "maxnreg": options.get("maxnreg"),
        "pointers": pointers,
        "divisible_by_16": [k for k in names if k in aligned],
    }


def _plain(value: Any) -> Any:
    value = getattr(value, "value", value)
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True)


def probe_archs(archs: tuple[int, ...]) -> tuple[list[int], dict[int, str]]:
    """Keep the architectures the bundled Triton/ptxas can compile for; the rest with a reason."""
    kept, dropped = [], {}
    for cc in archs:
        try:
            triton.compile(
                ASTSource(fn=_probe_kernel, signature={"x_ptr": "*fp32"}, constexprs={}),
                target=GPUTarget("cuda", cc, 32),
            )
        except Exception as exc:  # noqa: BLE001
            dropped[cc] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            kept.append(cc)
    return kept, dropped


@triton.jit
def _probe_kernel(x_ptr):
    triton.language.store(x_ptr, 1.0)


# ------------------------------------------------------------------------------------- report


def run(
    points: list[Point],
    archs: list[int],
    log: Callable[[str], None],
    only: set[str] | None = None,
) -> list[dict[str, Any]]:
    cache: dict[tuple[str, int], tuple[dict[str, Any], Compiled]] = {}
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, pt in enumerate(points):
        launches = [la for la in drive(pt) if only is None or la.kernel.__name__.strip("_") in only]
        for launch in launches:
            for cc in archs:
                # Launches that differ only in the grid share one compile.
                try:
                    signature, constexprs, _attrs, options = _bind(
                        launch, GPUTarget("cuda", cc, 32)
                    )
                    sig_key = _key(describe(launch, signature, constexprs, options))
                except Exception as exc:  # noqa: BLE001 - compile_launch reports it
                    sig_key = f"unbound:{exc}"
                key = (launch.kernel.__name__ + sig_key, cc)
                if key not in cache:
                    cache[key] = compile_launch(launch, cc)
                config, res = cache[key]
                records.append({
                    "kernel": launch.kernel.__name__,
                    "arch": f"sm_{cc}",
                    "preset": pt.preset,
                    "shape": {k: v for k, v in asdict(pt).items() if k != "preset"},
                    "config": config,
                    **asdict(res),
                })  # fmt: skip
        log(f"[{i + 1}/{len(points)}] {pt} -> {len(launches)} launches, {len(cache)} compiles, "
            f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    return records


def _agg(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = all(r["ok"] for r in rows)
    good = [r for r in rows if r["ok"]]
    return {
        "ok": ok,
        "registers": max((r["registers"] for r in good), default=None),
        "spill_bytes": max((r["spill_bytes"] for r in good), default=None),
        "shared_bytes": max((r["shared_bytes"] for r in good), default=None),
        "tensor_cores": any(r["tensor_cores"] for r in good),
    }


def markdown(records: list[dict[str, Any]], precision: str | None = None) -> str:
    """Table kernel x architecture x preset (max over K in {4, 16, 64} and fp32/fp16 inputs)."""
    rows = [r for r in records if r["preset"] is not None]
    if precision is not None:
        rows = [r for r in rows if r["shape"]["precision"] == precision]
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(
            (r["kernel"], r["arch"], r["preset"], r["shape"]["precision"]), []
        ).append(r)
    order = {"official": 0, "paper": 1, "demo": 2}
    lines = [
        "| kernel | arch | preset | precision | registers | spill bytes | shared KB | tensor cores |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for (kern, arch, preset, prec), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 9), kv[0][3])
    ):
        a = _agg(rs)
        if not a["ok"]:
            lines.append(f"| `{kern}` | {arch} | {preset} | {prec} | compile failed | | | |")
            continue
        lines.append(
            f"| `{kern}` | {arch} | {preset} | {prec} | {a['registers']} | {a['spill_bytes']} | "
            f"{a['shared_bytes'] / 1024:.1f} | {'yes' if a['tensor_cores'] else 'no'} |"
        )
    return "\n".join(lines)


def summary(records: list[dict[str, Any]]) -> str:
    failed = [r for r in records if not r["ok"]]
    spills = [r for r in records if r["ok"] and r["spill_bytes"]]
    preset_spills = [r for r in spills if r["preset"] is not None]
    shared = max((r["shared_bytes"] for r in records if r["ok"]), default=0)
    lines = [
        f"{len(records)} launch records, {len(failed)} failed compiles, "
        f"{len(spills)} spilling ({len(preset_spills)} at presets), shared memory peak "
        f"{shared / 1024:.1f} KB"
    ]
    worst: dict[tuple[str, str], int] = {}
    for r in spills:
        key = (r["kernel"], r["arch"])
        worst[key] = max(worst.get(key, 0), r["spill_bytes"])
    for (kern, arch), b in sorted(worst.items()):
        lines.append(f"  spills: {kern} {arch}: up to {b} B")
    for r in failed[:10]:
        lines.append(f"  FAILED {r['kernel']} {r['arch']} {r['shape']}: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=("presets", "full", "all"), default="all")
    ap.add_argument("--arch", default=None,
                    help="comma-separated compute capabilities (default: 80,90 plus 89,100,120 "
                         "where the bundled ptxas supports them)")  # fmt: skip
    ap.add_argument("--precision", default=",".join(kernels.KERNEL_PRECISIONS),
                    help="comma-separated kernel precisions (train.kernel_precision)")  # fmt: skip
    ap.add_argument("--dtype", default=",".join(GRID_DTYPES), help="input dtypes (float32,float16)")
    ap.add_argument("--k", default=None, help="restrict K (comma-separated)")
    ap.add_argument("--kernel", default=None, help="restrict kernels (names without underscores)")
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the preset table here")
    ap.add_argument("--require-no-spills", action="store_true",
                    help="exit 1 if a preset configuration spills")  # fmt: skip
    args = ap.parse_args(argv)

    if args.arch:
        archs, dropped = probe_archs(tuple(int(a) for a in args.arch.split(",")))
    else:
        extra, dropped = probe_archs(EXTRA_ARCHS)
        archs = [*DEFAULT_ARCHS, *extra]
    for cc, why in dropped.items():
        print(f"sm_{cc}: skipped ({why})", file=sys.stderr)
    precisions = tuple(args.precision.split(","))
    dtypes = set(args.dtype.split(","))
    points = [p for p in grid_points(args.grid, precisions) if p.dtype in dtypes]
    if args.k:
        ks = {int(k) for k in args.k.split(",")}
        points = [p for p in points if p.K in ks]
    only = set(args.kernel.split(",")) if args.kernel else None
    records = run(points, sorted(archs), lambda s: print(s, file=sys.stderr, flush=True), only)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    table = markdown(records)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)
    print(summary(records))
    failed = any(not r["ok"] for r in records)
    preset_spill = any(r["ok"] and r["spill_bytes"] and r["preset"] for r in records)
    return 1 if failed or (args.require_no_spills and preset_spill) else 0


if __name__ == "__main__":
    sys.exit(main())
