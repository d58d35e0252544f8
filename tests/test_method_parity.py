"""A fixed-seed run of every method matches its recorded fingerprint (tests/method_parity.py).

The record was taken before the training package was split into one-concern modules; a change that
alters what training computes (data order, seeds, losses, schedule, kept model, predictions) shows
here as a differing history value, prediction or checkpoint tensor.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from method_parity import METHODS, RECORD, fingerprint, platform_key


def _close(a: Any, b: Any, path: str, exact: bool) -> list[str]:
    """Paths where ``a`` and ``b`` differ (exactly, or beyond a small tolerance)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))} differ"]
        keys = [k for k in a if exact or k != "sha256"]
        return [d for k in keys for d in _close(a[k], b[k], f"{path}.{k}", exact)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [
            d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]", exact)
        ]
    if exact:
        same = a == b or (
            isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        )
        return [] if same else [f"{path}: {a!r} != {b!r}"]
    fa, fb = _number(a), _number(b)
    if fa is None or fb is None:
        return [] if a == b else [f"{path}: {a!r} != {b!r}"]
    if math.isnan(fa) and math.isnan(fb):
        return []
    return [] if math.isclose(fa, fb, rel_tol=1e-3, abs_tol=1e-4) else [f"{path}: {a} != {b}"]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize("method", METHODS)
def test_fixed_seed_run_matches_the_record(
    method: str,
    record: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOMKD_PROGRESS", "0")
    work = tmp_path_factory.getbasetemp() / "method_parity"
    work.mkdir(exist_ok=True)
    got = json.loads(json.dumps(fingerprint(method, work)))  # the record's JSON types
    want = record["methods"][method]
    exact = record["platform"] == platform_key()
    diffs = _close(got, want, method, exact)
    assert not diffs, (
        f"{len(diffs)} differences ({'exact' if exact else 'tolerant'}): " + "; ".join(diffs[:8])
    )


def test_the_comparison_sees_a_changed_value(record: dict[str, Any]) -> None:
    """The comparison itself: one flipped bit of one tensor, or one changed loss, is caught."""
    want = record["methods"]["abmil"]
    changed = json.loads(json.dumps(want))
    first = next(iter(changed["checkpoint"]))
    changed["checkpoint"][first]["sha256"] = "0" * 64
    assert _close(changed, want, "abmil", exact=True)
    changed = json.loads(json.dumps(want))
    changed["history"][0]["train_loss"] *= 1.01
    assert _close(changed, want, "abmil", exact=False)
    assert not _close(json.loads(json.dumps(want)), want, "abmil", exact=True)
