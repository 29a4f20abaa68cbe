"""`lrs-rec --version` and every option's default in every command's --help (issue 12 §3)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version

import pytest
from lrs_rec.serving.cli import build_parser, main


def _parsers(
    parser: argparse.ArgumentParser, name: str = "lrs-rec"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lrs-rec {version('lrs-rec')}"
    done = subprocess.run(
        [sys.executable, "-m", "lrs_rec.serving.cli", "--version"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"lrs-rec {version('lrs-rec')}"


def test_every_option_with_a_default_shows_it_in_help():
    checked = 0
    parsers = dict(_parsers(build_parser()))
    assert {"lrs-rec train", "lrs-rec serve", "lrs-rec publish", "lrs-rec quickstart"} <= set(
        parsers
    )
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if (
                not action.option_strings
                or action.required
                or default is None
                or default is False
                or default is argparse.SUPPRESS
            ):
                continue
            shown = (
                " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
            )
            block = " ".join(formatter._format_action(action).split())
            assert re.search(r"default:?\s*" + re.escape(shown), block), (name, block)
            checked += 1
    assert checked >= 40  # every command's valued options were seen


def test_no_option_shows_its_default_twice():
    # regression: "target delta (default 1e-6) (default: 1e-06)", "clip (default, counted), ...
    # (default: clip)": a help text that named its default got it appended once more
    twice = []
    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            block = " ".join(formatter._format_action(action).split())
            if len(re.findall(r"\(default\b", block)) > 1:
                twice.append((name, block))
    assert not twice, twice
