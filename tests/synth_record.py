"""Fingerprint of one small synthetic cohort (the "earlier outputs stay valid" check of momkd synth).

Adding an output to ``momkd synth`` (such as the four-class ``subtype`` column) must leave every
earlier output unchanged, so that every figure measured on an earlier cohort stays valid. This
module generates one small cohort (internal and external, with ``.h5`` and ``.pt`` files) and
reduces it to a fingerprint of the outputs that existed before the ``subtype`` column:

* every array of both stores, of ``truth/*_patches.npz`` and of every ``.h5`` / ``.pt`` file: dtype,
  shape, a SHA-256 of the raw bytes and the float64 sum;
* the clinical tables without their ``subtype`` column, value by value;
* ``expression.csv`` and ``truth/{latent,genes}.csv``: a SHA-256 of the text and the float64 sum
  of the numbers;
* ``oracle.json`` with the output folder replaced by ``<out>``.

``python tests/synth_record.py --write`` records it in ``tests/data/synth_fingerprint.json``
together with the numpy version and platform; ``tests/test_synth.py`` generates the cohort again and
compares: on the platform of the record every hash must match, elsewhere the sums are compared with
a small tolerance. The record was taken with the generator as it was before the ``subtype`` column.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from records import emit

RECORD = Path(__file__).parent / "data" / "synth_fingerprint.json"

ARGS: dict[str, Any] = {
    "patients": 16,
    "external": 6,
    "dim": 32,
    "genes": 40,
    "patches": 20,
    "seed": 11,
    "h5": True,
    "pt": True,
}

# The columns and files added after the record was taken; everything else must be unchanged.
NEW_COLUMNS = ("subtype",)
NEW_FILES = ("truth/subtype.csv",)


def platform_key() -> str:
    """What bit-identity depends on besides the code."""
    return f"numpy {np.__version__} {platform.machine()}"


def _array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    numeric = a.dtype.kind in "biuf"
    return {
        "dtype": str(a.dtype),
        "shape": list(a.shape),
        "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        "sum": float(a.astype(np.float64).sum()) if numeric else None,
    }


def _text_table(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    total = 0.0
    for row in list(csv.reader(text.splitlines()))[1:]:
        for v in row:
            try:
                total += float(v)
            except ValueError:
                pass
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "sum": total}


def _clinical(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    keep = [j for j, name in enumerate(rows[0]) if name not in NEW_COLUMNS]
    return [[r[j] for j in keep] for r in rows]


def _store(path: Path) -> dict[str, Any]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    arrays = {name: _array(np.asarray(arr[:])) for name, arr in sorted(root.arrays())}
    return {"attrs": json.loads(json.dumps(dict(root.attrs))), "arrays": arrays}


def _h5(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as fh:
        return {
            name: {
                "array": _array(fh[name][...]),
                "chunks": list(fh[name].chunks or ()),
                "attrs": {k: np.asarray(v).tolist() for k, v in sorted(fh[name].attrs.items())},
            }
            for name in sorted(fh)
        }


def _pt(path: Path) -> dict[str, Any]:
    import torch

    return _array(torch.load(path, weights_only=True).numpy())


def _npz(path: Path) -> dict[str, Any]:
    with np.load(path) as z:
        return {name: _array(z[name]) for name in sorted(z.files)}


def _relative(obj: Any, out: str) -> Any:
    if isinstance(obj, dict):
        return {k: _relative(v, out) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(out, "<out>")
    return obj


def fingerprint(out: Path) -> dict[str, Any]:
    """Fingerprint of the earlier outputs of a cohort written to ``out``."""
    files = sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file()
        and p.relative_to(out).as_posix() not in NEW_FILES
        and ".zarr/" not in p.relative_to(out).as_posix()
    )
    report = json.loads((out / "oracle.json").read_text())
    return {
        "files": files,
        "stores": {name: _store(out / name) for name in ("cohort.zarr", "external.zarr")},
        "clinical": {
            name: _clinical(out / name) for name in ("clinical.csv", "external_clinical.csv")
        },
        "tables": {
            name: _text_table(out / name)
            for name in ("expression.csv", "truth/latent.csv", "truth/genes.csv")
        },
        "npz": {
            name: _npz(out / name)
            for name in ("truth/cohort_patches.npz", "truth/external_patches.npz")
        },
        "h5": {f: _h5(out / f) for f in files if f.endswith(".h5")},
        "pt": {f: _pt(out / f) for f in files if f.endswith(".pt")},
        "oracle": _relative(report, str(out)),
    }


def make(folder: Path) -> Path:
    """Generate the fixed cohort under ``folder``."""
    from momkd.synth import generate_cohort

    out = folder / "synth_record"
    generate_cohort(out, **ARGS, progress=False, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"record the fingerprint in {RECORD}")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        record = {
            "platform": platform_key(),
            "args": ARGS,
            "fingerprint": fingerprint(make(Path(tmp))),
        }
    return emit(record, RECORD, args.write)


if __name__ == "__main__":
    raise SystemExit(main())
