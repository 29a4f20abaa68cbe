"""The lrs-rec dispatcher registers every command and each one has working --help."""

from __future__ import annotations

import pytest

from serving.cli import COMMANDS, build_parser, main


def test_every_command_is_registered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert (
        set(sub.choices)
        == set(COMMANDS)
        >= {
            "train",
            "evaluate",
            "export",
            "publish",
            "serve",
            "quickstart",
        }
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_each_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: lrs-rec " + command in capsys.readouterr().out


def test_missing_required_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate"])
    assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err
