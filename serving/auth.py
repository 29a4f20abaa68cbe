"""API keys of the HTTP service: the keys file, bearer-token checks, and the bind rule.

Keys file (``lrs-rec serve --api-keys FILE``, written by ``lrs-rec keys add``): one key per line,
``<scope> <key-id> <sha256-hex of the secret>``; blank lines and lines starting with ``#`` are
skipped. Scopes nest: ``read`` (score, recommend, model) < ``write`` (also onboarding, the user's
ratings, erasure) < ``admin`` (everything). Clients send ``Authorization: Bearer <secret>``.

Only the SHA-256 of a secret is stored. A presented secret is hashed and compared with EVERY key's
digest by :func:`hmac.compare_digest` (no early exit), so the time taken does not depend on how
much of a digest matched nor on which key it is. Secrets never reach a log line, an error message
or a metric label: the 401/403 bodies name the key id at most.
"""

# no `from __future__ import annotations`: FastAPI reads the dependency's annotations at run time

import hashlib
import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCOPES = ("read", "write", "admin")
_RANK = {s: i for i, s in enumerate(SCOPES)}
KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
REALM = "lrs-rec"


@dataclass(frozen=True)
class ApiKey:
    scope: str
    key_id: str
    digest: bytes  # sha256 of the secret (32 bytes)

    def allows(self, scope: str) -> bool:
        return _RANK[self.scope] >= _RANK[scope]


def hash_secret(secret: str | bytes) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True)
class KeyRing:
    """The keys of one keys file."""

    keys: tuple[ApiKey, ...]
    source: str = ""

    def authenticate(self, secret: str | bytes) -> ApiKey | None:
        """The key whose digest equals sha256(secret), or None; constant time over all keys."""
        digest = hash_secret(secret)
        found = None
        for key in self.keys:  # every key is compared, match or not
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found


def parse_keys(lines: Sequence[str], source: str) -> KeyRing:
    """Parse the lines of a keys file; a bad line raises ValueError naming ``source:line``."""
    keys: list[ApiKey] = []
    ids: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for no, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{source}:{no}"
        fields = text.split()
        if len(fields) != 3:
            raise ValueError(
                f"{where}: expected '<scope> <key-id> <sha256-hex>', got {len(fields)} field(s)"
            )
        scope, key_id, hexd = fields
        if scope not in _RANK:
            raise ValueError(f"{where}: unknown scope {scope!r} (one of {', '.join(SCOPES)})")
        if not KEY_ID_RE.fullmatch(key_id):
            raise ValueError(f"{where}: key id {key_id[:80]!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if not _HEX64.fullmatch(hexd.lower()):
            # never echo the field: someone may have pasted a secret instead of its hash
            raise ValueError(
                f"{where}: the third field must be the 64-hex-digit SHA-256 of the secret "
                f"(got {len(hexd)} characters); create keys with `lrs-rec keys add`"
            )
        if key_id in ids:
            raise ValueError(f"{where}: key id {key_id!r} repeats line {ids[key_id]}")
        digest = bytes.fromhex(hexd)
        if digest in digests:
            raise ValueError(f"{where}: the same secret hash as line {digests[digest]}")
        ids[key_id] = no
        digests[digest] = no
        keys.append(ApiKey(scope, key_id, digest))
    return KeyRing(tuple(keys), source)


def load_api_keys(path: str | os.PathLike[str]) -> KeyRing:
    """Read a keys file (``--api-keys``). Refuses a file without keys and a world-writable one
    (anyone on the machine could add a key of their own)."""
    p = Path(path)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"--api-keys {p}: is a directory, not a keys file")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"--api-keys {p}: no such file (create one with `lrs-rec keys add --file {p}`)"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--api-keys {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if st.st_mode & stat.S_IWOTH:
        raise ValueError(
            f"--api-keys {p}: the file is world-writable, so anyone could add a key: chmod o-w {p}"
        )
    ring = parse_keys(text.splitlines(), str(p))
    if not ring.keys:
        raise ValueError(f"--api-keys {p}: no keys (add one with `lrs-rec keys add --file {p}`)")
    return ring


def key_line(scope: str, key_id: str, secret: str) -> str:
    """The keys-file line of a new key (the secret itself is not in it)."""
    return f"{scope} {key_id} {hash_secret(secret).hex()}"


# -- the bind rule ------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost``; any other name or address is not."""
    h = host.strip().lower()
    if h == "localhost":
        return True
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


SERVE_REMEDY = (
    "pass --api-keys FILE (create keys with `lrs-rec keys add`) or, on a trusted network only, "
    "--allow-unauthenticated"
)


def check_bind(
    host: str,
    *,
    authenticated: bool,
    allow_unauthenticated: bool,
    command: str = "serve",
    remedy: str = SERVE_REMEDY,
) -> str | None:
    """Without API keys only a loopback address may be bound: raises ValueError for any other
    unless ``allow_unauthenticated``, and then returns the warning to print."""
    if authenticated or is_loopback(host):
        return None
    if not allow_unauthenticated:
        raise ValueError(
            f"refusing to listen on {host!r} without authentication: anyone who can reach it "
            f"could read and rewrite every user's ratings; {remedy}"
        )
    return (
        f"lrs-rec {command}: WARNING: listening on {host} WITHOUT authentication "
        "(--allow-unauthenticated): anyone who can reach this address can read and rewrite "
        "every user's ratings"
    )


def check_port(host: str, port: int, flag: str = "--port") -> None:
    """Raise ValueError naming ``flag`` when ``host:port`` cannot be bound (in use, not an
    address of this machine), before a command prints that it listens there or does any work.
    Bound the way uvicorn binds (SO_REUSEADDR) and released at once; port 0 always passes."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port} ({why})") from None


# -- FastAPI dependencies -------------------------------------------------------------------------------
def guard(keyring: KeyRing | None, scope: str) -> list[Any]:
    """Route ``dependencies`` requiring ``scope`` (none at all without a keyring: no per-request
    cost when authentication is off). 401 + ``WWW-Authenticate: Bearer`` for missing or invalid
    credentials, 403 for a key of a lower scope."""
    if scope not in _RANK:
        raise ValueError(f"unknown scope {scope!r}")
    if keyring is None:
        return []
    from fastapi import Depends, Request
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException

    bearer = HTTPBearer(auto_error=False, description=f"an API key of scope {scope} or higher")

    async def require_scope(
        request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> None:
        if cred is None:
            raise HTTPException(
                401,
                "missing credentials: send 'Authorization: Bearer <secret>'",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        key = keyring.authenticate(cred.credentials.strip())
        if key is None:
            raise HTTPException(
                401,
                "invalid credentials",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
            )
        if not key.allows(scope):
            raise HTTPException(
                403,
                f"key {key.key_id!r} has scope {key.scope!r}; this route needs {scope!r}",
                headers={
                    "WWW-Authenticate": (
                        f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"'
                    )
                },
            )
        request.state.api_key_id = key.key_id

    return [Depends(require_scope)]
