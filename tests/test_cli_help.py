"""`sct --help` lists every subcommand, and each has its own --help with examples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sct.cli import main

SUBCOMMANDS = ["train", "export", "embed", "index", "eval", "search", "serve", "demo", "report", "simulate-gradients"]


def test_top_level_help_lists_every_subcommand() -> None:
    result = subprocess.run([sys.executable, "-m", "sct", "--help"], capture_output=True, text=True, check=True)
    listed = result.stdout.split("positional arguments:")[1].split("options:")[0]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed or f"\n    {name}\n" in listed, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_help_shows_examples(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Examples:" in out and f"sct {name}" in out


def test_a_wrong_flag_is_a_usage_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["index", "--model", "m.onnx", "--images", "d", "--out", "o", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pt" in err and "Traceback" not in err
