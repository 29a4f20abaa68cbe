"""``lrs-rec keys``: API keys of ``lrs-rec serve --api-keys FILE``.

lrs-rec keys add --scope read|write|admin --file FILE [--key-id ID]
lrs-rec keys list --file FILE

``add`` draws a random secret (``secrets.token_urlsafe(32)``: 256 bits), appends
``<scope> <key-id> <sha256-hex>`` to FILE (created with mode 0600) and prints the secret once,
alone on the last line of its output; FILE never holds the secret itself.
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
import sys
from pathlib import Path

from lrs_rec.serving.auth import KEY_ID_RE, SCOPES, key_line, parse_keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="create a key: append its hash to FILE, print the secret once")
    add.add_argument("--scope", choices=SCOPES, required=True, help="what the key may do")
    add.add_argument("--file", metavar="FILE", required=True, help="keys file (created 0600)")
    add.add_argument(
        "--key-id",
        metavar="ID",
        default=None,
        help="name of the key (1-64 of A-Z a-z 0-9 . _ -; default: a random one)",
    )
    ls = sub.add_parser("list", help="list the key ids and scopes of FILE (no secrets)")
    ls.add_argument("--file", metavar="FILE", required=True, help="keys file")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as e:  # as `serve --api-keys` says it, naming the file
        raise ValueError(f"--file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if args.action == "list":
        if not path.is_file():
            raise ValueError(f"--file {path}: no such file")
        for key in parse_keys(_read_lines(path), str(path)).keys:
            print(f"{key.scope:<6} {key.key_id}")
        return 0
    if path.is_dir():
        raise ValueError(f"--file {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--file {path}: directory {path.parent} does not exist")
    ring = parse_keys(_read_lines(path), str(path))  # a broken file is reported, not appended to
    if path.exists() and path.stat().st_mode & stat.S_IWOTH:  # serve --api-keys refuses it too
        raise ValueError(
            f"--file {path}: the file is world-writable, so anyone could add a key: chmod o-w {path}"
        )
    key_id = args.key_id if args.key_id is not None else f"key-{secrets.token_hex(4)}"
    if not KEY_ID_RE.fullmatch(key_id):
        raise ValueError(f"--key-id {key_id[:80]!r}: must be 1-64 of A-Z a-z 0-9 . _ -")
    if any(k.key_id == key_id for k in ring.keys):
        raise ValueError(f"--key-id {key_id!r}: {path} already has a key of that id")
    secret = secrets.token_urlsafe(32)
    line = key_line(args.scope, key_id, secret) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if f.tell() > 0 and not path.read_bytes().endswith(b"\n"):
            line = "\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    print(f"added key {key_id} (scope {args.scope}) to {path}")
    print("the secret follows; it is shown only this once (the file keeps its SHA-256 only).")
    print("clients send it as 'Authorization: Bearer <secret>':", flush=True)
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()
    return 0
