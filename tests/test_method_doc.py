"""docs/METHOD.md: its constants tables agree with the code, and the code cites only it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from momkd.config import load_config
from momkd.model import LossWeights, ModelConfig, MoMKD

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"


def _table(name: str) -> list[list[str]]:
    """Rows (cells stripped, backticks removed) between ``<!-- name:begin -->`` and ``:end``."""
    text = METHOD.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"no {name} table in {METHOD}"
    rows = []
    for line in match.group(1).strip().splitlines()[2:]:  # skip the header and the rule
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rows.append(cells)
    return rows


def _value(text: str) -> Any:
    return yaml.safe_load(text)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_constants_table_matches_config_defaults(tmp_path: Path) -> None:
    from momkd.config import preset_yaml

    rows = _table("constants")
    assert len(rows) >= 40
    default = load_config(None)
    paper = load_config(None, ["model.preset=paper"])
    (tmp_path / "o.yaml").write_text(preset_yaml("official"))
    released = load_config(tmp_path / "o.yaml")
    for key, off, pap, rel, _meaning in rows:
        assert _get(default, key) == _value(off), (key, _get(default, key), off)
        assert _get(paper, key) == _value(pap), (key, _get(paper, key), pap)
        assert _get(released, key) == _value(rel), (key, _get(released, key), rel)


def test_constants_table_matches_model_constants() -> None:
    """The model classes have their own defaults; they must say the same as the table."""
    rows = {key: (_value(off), _value(pap)) for key, off, pap, _, _ in _table("constants")}
    model_cfg = {"official": ModelConfig(), "paper": ModelConfig.preset("paper")}
    loss_cfg = {"official": LossWeights(), "paper": LossWeights.preset("paper")}
    for col, preset in enumerate(("official", "paper")):
        for key, values in rows.items():
            section, name = key.split(".")
            if section == "model" and hasattr(model_cfg[preset], name):
                assert getattr(model_cfg[preset], name) == values[col], (preset, key)
            if section == "loss" and hasattr(loss_cfg[preset], name):
                assert getattr(loss_cfg[preset], name) == values[col], (preset, key)
            if section == "memory" and name in ("momentum", "dead_after", "update"):
                field = "memory_update" if name == "update" else name
                assert getattr(model_cfg[preset], field) == values[col], (preset, key)
        assert model_cfg[preset].genes == rows["genomics.n_genes"][col]
    # theta starts at ln(tau_init)
    model = MoMKD(ModelConfig(d_in=8, hidden=8, sphere=4, memory_k=2, genes=6))
    assert model.log_tau.item() == pytest.approx(torch.log(torch.tensor(0.2)).item())


def test_fixed_constants_match_the_encoder() -> None:
    rows = {key: _value(value) for key, value, _where in _table("fixed")}
    enc = MoMKD(ModelConfig(d_in=12, hidden=8, sphere=4, memory_k=2, genes=6)).histology_encoder
    for conv in (enc.gat1, enc.gat2):
        assert conv.negative_slope == rows["gat.negative_slope"]
        assert conv.add_self_loops == rows["gat.self_loops"]
        assert conv.concat == rows["gat.concat_heads"]
    assert len(rows) == 3


def test_sections_cited_by_the_code_exist() -> None:
    text = METHOD.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))
    needed = {
        "1",
        "1.1",
        "1.2",
        "2",
        *(f"2.{i}" for i in range(1, 9)),
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
    }
    assert needed <= headings, sorted(needed - headings)
    cited: set[str] = set()
    for folder in ("python", "rust", "tests", "benches", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".rs", ".pyi", ".md", ".sh"):
                body = path.read_text(encoding="utf-8", errors="replace")
                for ref in re.findall(r"METHOD\.md §(\d+(?:\.\d+)?)", body):
                    cited.add(ref)
    assert cited, "no citation found"
    assert cited <= headings, sorted(cited - headings)


def test_nothing_cites_the_old_reference() -> None:
    word = "SP" + "EC"  # spelled in two parts so that this file does not match itself
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "grep", "-n", word, "--", "python", "rust", "tests", "benches", "docs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr
    assert out.stdout == ""
