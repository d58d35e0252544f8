"""describe / format_info: summary numbers against numpy and the file system, validation results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from momkd.data import StoreWriter, describe, format_info
from momkd.errors import StoreError

D = 10
SIZES = [5, 200, 1, 64, 91]


@pytest.fixture()
def store(tmp_path) -> Path:
    rng = np.random.default_rng(4)
    path = tmp_path / "c.zarr"
    with StoreWriter(
        path, D, chunk_rows=64, attrs={"encoder": "conch_v15", "patch_size": 512}
    ) as w:
        for i, p in enumerate(SIZES):
            w.append(f"slide-{i}", rng.normal(size=(p, D)), rng.integers(0, 9999, size=(p, 2)))
    return path


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_describe_valid_store(store):
    d = describe(store, progress=False)
    assert d["valid"] is True and d["error"] is None and d["complete"] is True
    assert d["slides"] == len(SIZES) and d["patches"] == sum(SIZES)
    assert d["bag_size"] == {
        "min": int(np.min(SIZES)),
        "median": float(np.median(SIZES)),
        "max": int(np.max(SIZES)),
    }
    assert d["feature_dim"] == D and d["dtype"] == "float16" and d["chunk_rows"] == 64
    feats = d["arrays"]["features"]
    assert feats["shape"] == [sum(SIZES), D] and feats["chunks"] == [64, D]
    assert feats["codecs"][0] == "bytes"
    assert feats["codecs"][1].startswith("blosc") and "cname=lz4" in feats["codecs"][1]
    assert feats["codecs"][2] == "crc32c"
    assert any(
        c.startswith("zstd") and "level=3" in c and "checksum=True" in c
        for c in d["arrays"]["coords"]["codecs"]
    )
    assert d["arrays"]["coords"]["dtype"] == "int32"
    assert d["bytes_on_disk"] == disk_bytes(store)
    decoded = sum(SIZES) * D * 2 + sum(SIZES) * 2 * 4 + (len(SIZES) + 1) * 8
    assert d["bytes_decoded"] == decoded
    assert d["compression_ratio"] == pytest.approx(decoded / disk_bytes(store))
    assert d["header"]["encoder"] == "conch_v15" and "slide_ids" not in d["header"]
    assert d["checked"] is False
    json.dumps(d)
    text = format_info(d)
    assert "valid" in text and "conch_v15" in text and f"{sum(SIZES)}" in text
    assert "min 1, median 64, max 200" in text


def test_describe_check_decodes_every_slide(store):
    d = describe(store, check=True, progress=False)
    assert d["valid"] and d["checked"] and d["slides_checked"] == len(SIZES)
    assert f"all {len(SIZES)} slides decoded" in format_info(d)


def test_describe_check_finds_corrupt_chunk(store):
    chunk = (
        store / "features" / "c" / "3" / "0"
    )  # rows 192..255: slide-1 ends at 205, slide-2, slide-3
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    chunk.write_bytes(bytes(raw))
    assert describe(store, progress=False)["valid"] is True  # metadata alone is fine
    d = describe(store, check=True, progress=False)
    assert d["valid"] is False and d["slides_checked"] == 1
    assert "slide-1" in d["error"]
    assert "INVALID" in format_info(d) and "slide-1" in format_info(d)


def test_describe_incomplete_store(tmp_path):
    path = tmp_path / "part.zarr"
    w = StoreWriter(path, D, chunk_rows=64, commit_interval=0)
    rng = np.random.default_rng(0)
    for i, p in enumerate([100, 50, 30]):
        w.append(f"s{i}", rng.normal(size=(p, D)), np.zeros((p, 2), int))
    d = describe(path, progress=False)
    assert d["valid"] is False and d["complete"] is False
    assert "complete" in d["error"]
    assert d["ingest"]["slides_done"] == w.committed_slides
    assert "interrupted" in format_info(d)


def test_describe_missing_array_reports_error(store):
    import shutil

    shutil.rmtree(store / "offsets")
    d = describe(store, progress=False)
    assert d["valid"] is False and "offsets" in d["error"]
    assert d["arrays"]["offsets"] is None
    assert "missing" in format_info(d)


def test_describe_not_a_store(tmp_path):
    with pytest.raises(StoreError):
        describe(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="zarr.json"):
        describe(tmp_path / "empty")
