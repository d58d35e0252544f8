"""The command line's own behaviour: where ``--debug`` and ``--verbose`` go, and how a mistyped
command line is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from momkd.cli import main
from momkd.errors import MomkdError


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_debug_after_the_command_shows_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.zarr")
    # Without --debug: a one-line error and exit code 2; with it, before or after the command,
    # the exception itself (its traceback).
    assert main(["info", missing]) == 2
    for argv in (["--debug", "info", missing], ["info", missing, "--debug"]):
        with pytest.raises(MomkdError, match="nope.zarr"):
            main(argv)


def test_verbose_after_the_command_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "run.yaml"
    assert main(["init-config", "--out", str(out), "-v"]) == 0
    assert out.is_file()
    assert main(["init-config", "--out", str(out), "--verbose", "--debug"]) == 0


@pytest.mark.parametrize(
    ("argv", "command", "needle"),
    [
        (["train", "--config", "x.yaml", "--bogus"], "train", "unrecognized arguments: --bogus"),
        (["train"], "train", "--config"),
        (["synth", "out", "--patients", "-1"], "synth", "--patients"),
        (["predict", "run"], "predict", "--store"),
    ],
)
def test_usage_errors_name_the_command_after_its_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], command: str, needle: str
) -> None:
    lines = _usage_error(capsys, argv)
    assert lines[0].startswith(f"usage: momkd {command} ")
    assert lines[-1].startswith(f"momkd {command}: error: ")
    assert needle in lines[-1]
    assert not any("momkd momkd" in line for line in lines)


def test_usage_error_without_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _usage_error(capsys, [])
    assert lines[0].startswith("usage: momkd ")
    assert lines[-1] == "momkd: error: the following arguments are required: COMMAND"
