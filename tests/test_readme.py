"""The README stays in step with the code: its command table lists exactly the options of every
command's ``--help``, and its Python examples run as written (on the CPU, on a tiny cohort)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from momkd.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"

#: Options every command takes; the README names them once, below the table.
COMMON = {"-h", "--help", "--debug", "-v", "--verbose"}


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _table_rows() -> dict[str, str]:
    """Command name -> the synopsis cell of its row in the README's command table."""
    rows: dict[str, str] = {}
    for line in _section(README.read_text(encoding="utf-8"), "Command line").splitlines():
        m = re.match(r"\| `momkd ([a-z-]+)(.*?)` \|", line)
        if m:
            assert m.group(1) not in rows, f"two rows for {m.group(1)}"
            rows[m.group(1)] = m.group(2)
    return rows


def _help_options(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """The option strings of each optional argument of ``parser`` (its ``--help``)."""
    return [
        tuple(a.option_strings)
        for a in parser._actions
        if a.option_strings and not set(a.option_strings) & COMMON
    ]


def test_command_table_lists_every_command_and_option_of_help() -> None:
    parser = build_parser()
    rows = _table_rows()
    assert set(rows) == set(parser.commands), "commands in the README table vs momkd --help"
    for name, sub in parser.commands.items():
        synopsis = rows[name]
        named = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", synopsis))
        options = _help_options(sub)
        missing = [opts[-1] for opts in options if not named & set(opts)]
        assert not missing, f"momkd {name}: in --help but not in the README table: {missing}"
        known = {o for opts in options for o in opts}
        unknown = sorted(named - known)
        assert not unknown, f"momkd {name}: in the README table but not in --help: {unknown}"
        # The help text itself lists them too (what a user reads).
        text = sub.format_help()
        assert all(opts[-1] in text for opts in options)


def test_readme_names_the_options_every_command_takes() -> None:
    text = _section(README.read_text(encoding="utf-8"), "Command line")
    for option in ("--debug", "--verbose", "--help"):
        assert f"`{option}`" in text, option


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


RUN_YAML = """\
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
splits: {k: 2}
genomics: {n_genes: 8}
model: {hidden: 8, omics_width: 8, omics_hidden: 8, sphere: 4, memory_k: 2, classifier_hidden: 4}
memory: {init_per_class: 200}
train: {epochs: 1, min_epochs: 1, patience: 1, device: cpu}
"""


def test_python_examples_run_as_written_on_cpu(tmp_path: Path) -> None:
    from momkd.synth import generate_cohort

    blocks = _python_blocks()
    assert len(blocks) >= 3, "the README's Python examples"
    assert any("load_config" in b and "from momkd.config import load_config" in b for b in blocks)
    generate_cohort(
        tmp_path, patients=20, external=0, dim=32, genes=20, patches=10, seed=9, progress=False
    )
    (tmp_path / "run.yaml").write_text(RUN_YAML)
    script = tmp_path / "readme_examples.py"
    # One script, as a reader would paste the blocks one after the other.
    script.write_text("\n".join(blocks), encoding="utf-8")
    env = dict(os.environ)
    env["MOMKD_PROGRESS"] = "0"
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU
    res = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "test AUC" in res.stdout
    assert (tmp_path / "runs" / "api" / "summary.json").is_file()
