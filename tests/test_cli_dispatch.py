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


def test_cli_uses_one_blas_thread_unless_the_environment_sets_it(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from serving.cli import BLAS_THREAD_VARS, blas_threads

    for var in BLAS_THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    with threadpool_limits(limits=2, user_api="blas"):  # whatever the suite's own setting
        with blas_threads():
            assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {1}
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
        with blas_threads():  # the user's explicit choice is kept
            assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}
