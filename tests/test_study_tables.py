"""The recipe study's tables (scripts/recipe_tables.py): margins against meanpool, misses of the
target (ABMIL and MoMKD >= meanpool - 0.01) and the learning-curve figure, on hand-made rows."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "recipe_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("recipe_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(plan: str, cohort: str, method: str, auc: float, std: float = 0.02) -> dict[str, object]:
    return {
        "plan": plan,
        "cohort": cohort,
        "method": method,
        "recipe": "chosen",
        "auc_mean": auc,
        "auc_std": std,
    }


def test_cohort_table_margins_and_misses(tables, tmp_path: Path) -> None:
    rows = [
        _row("final", "a", "meanpool", 0.700),
        _row("final", "a", "abmil", 0.695),  # -0.005: within the target
        _row("final", "a", "momkd", 0.650),  # -0.050: a miss
        _row("final", "b", "meanpool", 0.600),
        _row("final", "b", "abmil", 0.580),  # -0.020: a miss
        _row("final", "b", "momkd_histo", 0.640),  # +0.040, shown as MoMKD (histo)
        _row("final", "d", "meanpool", 0.900),  # no MoMKD run: left out of the means
        _row("final", "d", "abmil", 0.800),  # -0.100: a miss
        _row("confirm", "c", "meanpool", 0.5),
    ]
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = tables.cohort_table(tables._rows(path), "final", "chosen")
    lines = table.splitlines()
    assert lines[2] == ("| a | 0.700 ± 0.020 | 0.695 ± 0.020 | 0.650 ± 0.020 | -0.005 | -0.050 ✗ |")
    assert lines[3] == (
        "| b | 0.600 ± 0.020 | 0.580 ± 0.020 | 0.640 ± 0.020 (histo) | -0.020 ✗ | +0.040 |"
    )
    assert lines[4] == "| d | 0.900 ± 0.020 | 0.800 ± 0.020 | — | -0.100 ✗ | — |"
    # Means over the two cohorts with all three methods, computed by hand.
    assert lines[5] == (
        "| **mean of the 2 cohorts with all three** | **0.650** | **0.637** | **0.645** | "
        "misses: 2 of 3 | misses: 1 of 2 |"
    )
    assert "| c |" not in table


def test_curve_plot_writes_a_figure(tables, tmp_path: Path) -> None:
    def block(d: float) -> dict[str, object]:
        return {
            "pooled_auc": {"momkd": {"value": 0.6}, "momkd_histo": {"value": 0.6 - d}},
            "paired": [
                {
                    "a": "momkd",
                    "b": "momkd_histo",
                    "auc_diff": d,
                    "ci_low": d - 0.03,
                    "ci_high": d + 0.03,
                    "p_value": 0.5,
                }
            ],
        }

    paired = {"curve": {"x": {"0.25": block(0.02), "0.5": block(0.01), "1.0": block(-0.01)}}}
    png = tables.curve_plot(paired, tmp_path / "img" / "c.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tables.curve_plot({"curve": {"x": {"0.25": {}}}}, tmp_path / "none.png") is None
    lines = tables.paired_tables(json.loads(json.dumps(paired)))
    assert any(
        "| x | 0.25 | 0.600 | 0.580 |" in line and "+0.020 [-0.010, +0.050]" in line
        for line in lines
    )
