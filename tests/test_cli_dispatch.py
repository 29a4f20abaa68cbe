"""The lrs-rec dispatcher registers every command and each one has working --help."""

from __future__ import annotations

import pytest
from lrs_rec.serving.cli import COMMANDS, build_parser, main


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
    import scipy.linalg  # noqa: F401  (its own OpenBLAS must be limited too)
    from lrs_rec.serving.cli import BLAS_THREAD_VARS, blas_threads
    from threadpoolctl import threadpool_info, threadpool_limits

    for var in BLAS_THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    with threadpool_limits(limits=2, user_api="blas"):  # whatever the suite's own setting
        with blas_threads():
            assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {1}
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
        with blas_threads():  # the user's explicit choice is kept
            assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {2}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--model", "m", "--port", "99999"], "--port: must be between 0 and 65535"),
        (["serve", "--model", "m", "--port", "-1"], "--port: must be between 0 and 65535"),
        (["serve", "--model", "m", "--max-n", "0"], "--max-n: must be at least 1"),
        (
            ["serve", "--model", "m", "--max-body-bytes", "-1"],
            "--max-body-bytes: must be at least 1",
        ),
        (["serve", "--model", "m", "--workers", "0"], "--workers: must be at least 1"),
        (["serve", "--model", "m", "--redis-timeout", "nan"], "--redis-timeout: must be a finite"),
        (["serve", "--model", "m", "--log-level", "bogus"], "--log-level: invalid choice"),
        (["publish", "--prune", "--keep", "-3"], "--keep: must be at least 0"),
        (["publish", "--model", "m", "--history-cap", "0"], "--history-cap: must be at least 1"),
        (["publish", "--model", "m", "--max-epsilon", "nan"], "--max-epsilon: must be a finite"),
        (["quickstart", "--seed", "-1"], "--seed: must be at least 0"),
        (
            ["evaluate", "--model", "m", "--ratings", "r", "--relevance-threshold", "nan"],
            "--relevance-threshold: must be a finite number",
        ),
        (
            ["train", "--ratings", "r", "--out", "o", "--epsilon", "1", "--dp-noise-seed", "-1"],
            "--dp-noise-seed: must be at least 0",
        ),
        # audit: was "epsilon must be a positive finite number or None, got 0.0", after reading
        # the ratings; None is the Python API's "no privacy", not something to type
        (["train", "--ratings", "r", "--out", "o", "--epsilon", "0"], "--epsilon: must be a fi"),
        (["train", "--ratings", "r", "--out", "o", "--epsilon", "-2"], "> 0, got '-2'"),
        (["train", "--ratings", "r", "--out", "o", "--epsilon", "inf"], "--epsilon: must be a fi"),
        (["train", "--ratings", "r", "--out", "o", "--epsilon", "nan"], "--epsilon: must be a fi"),
        (["train", "--ratings", "r", "--out", "o", "--epsilon", "x"], "expected a number, got 'x'"),
        (["train", "--ratings", "r", "--out", "o", "--delta", "0"], "--delta: must be a finite"),
        (["train", "--ratings", "r", "--out", "o", "--delta", "1"], "> 0 and < 1, got '1'"),
    ],
)
def test_out_of_range_options_are_usage_errors(argv, message, capsys) -> None:
    """Found by fuzzing: --port 99999 bound port 34463, --keep -3 deleted every older version,
    --max-n 0 refused every recommend; all were accepted."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_an_os_error_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys) -> None:
    home = tmp_path / "a-file"
    home.write_text("")
    monkeypatch.setenv("LRS_HOME", str(home))
    assert main(["publish", "--list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lrs-rec publish: error: ") and str(home) in err
    assert "Traceback" not in err


def test_garbage_onnx_file_is_a_clear_error(tmp_path) -> None:
    from lrs_rec.serving.onnx_scorer import OnnxScorer

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match=r"model.onnx: not a readable ONNX model .*lrs-rec export"):
        OnnxScorer(bad)


def test_privacy_budget_and_epsilon_bounds(monkeypatch) -> None:
    from lrs_rec.training.private_accounting import budget_from_env
    from lrs_rec.training.private_train import MAX_EPSILON, PrivateConfig

    with pytest.raises(ValueError, match="above 256"):
        PrivateConfig(epsilon=1e7)
    with pytest.raises(ValueError, match="epsilon must be a positive finite number or None"):
        PrivateConfig(epsilon=0.0)  # the Python API: None (no privacy) is a valid value there
    PrivateConfig(epsilon=MAX_EPSILON)
    monkeypatch.setenv("LRS_MAX_DELTA", "nan")
    with pytest.raises(ValueError, match="LRS_MAX_DELTA='nan' must be a finite number >= 0"):
        budget_from_env()
