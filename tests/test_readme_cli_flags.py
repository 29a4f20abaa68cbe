"""The CLI as README.md and docs/*.md write it: every `--flag` shown on an `lrs-rec COMMAND` line
(a shell block, with its indented continuation lines, or an inline code span) is an option of
that command, and every option of every command is mentioned in README.md."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from lrs_rec.serving.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_COMMAND = re.compile(r"\s*lrs-rec ((?:keys )?[a-z]+)(.*)")


def _commands() -> dict[str, set[str]]:
    """``{"train": {"--ratings", ...}, "keys add": {...}, ...}``."""
    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    full = f"{prefix} {name}".strip()
                    out[full] = {o for a in sub._actions for o in a.option_strings}
                    walk(sub, full)

    walk(build_parser(), "")
    return out


def _invocations(text: str) -> list[tuple[str, str]]:
    """(command, rest of the line) of every `lrs-rec COMMAND ...` in shell blocks and code spans."""
    found: list[tuple[str, str]] = []
    lang: str | None = None
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            current = None
            continue
        if lang not in ("bash", "sh", ""):
            continue
        line = re.split(r"\s#\s", line)[0]  # a trailing shell comment
        m = _COMMAND.match(line)
        if m:
            current = [m.group(1), m.group(2)]
            found.append((current[0], current[1]))
        elif current is not None and line.startswith(" "):
            current[1] += " " + line
            found[-1] = (current[0], current[1])
        else:
            current = None
    found += re.findall(r"`lrs-rec ((?:keys )?[a-z]+)([^`]*)`", text)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_flag_exists(doc: Path) -> None:
    commands = _commands()
    wrong = []
    for command, rest in _invocations(doc.read_text()):
        if command not in commands:
            wrong.append(f"lrs-rec {command}: no such command")
            continue
        wrong += [
            f"lrs-rec {command} {f}" for f in _FLAG.findall(rest) if f not in commands[command]
        ]
    assert not wrong, f"{doc.name} shows flags that --help does not have: {sorted(set(wrong))}"


def test_every_flag_is_documented_in_the_readme() -> None:
    mentioned = set(_FLAG.findall((ROOT / "README.md").read_text()))
    missing = {
        f"lrs-rec {command} {flag}"
        for command, flags in _commands().items()
        for flag in flags
        if flag.startswith("--") and flag != "--help" and flag not in mentioned
    }
    assert not missing, f"options README.md never mentions: {sorted(missing)}"


def test_the_checker_sees_a_wrong_flag() -> None:
    text = "```bash\nlrs-rec recommend --model m --users u.csv   # top\n    [--item-col C]\n```\n"
    ((command, rest),) = _invocations(text)
    assert command == "recommend" and _FLAG.findall(rest) == ["--model", "--users", "--item-col"]
    assert "--item-col" not in _commands()["recommend"]
