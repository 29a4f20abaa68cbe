"""A bounded per-process cache of users' Redis rows, kept exact by Redis's client-side-caching
invalidation (``CLIENT TRACKING``, RESP3 push messages).

What is cached is what a recommendation reads from Redis — the user's record and rating history
bytes, exactly as Redis returned them (or their absence) — never an answer: a hit is scored anew by
the same code as a miss, so cache on and off give the same answers (tested).

Why it stays exact: the rows are read on :class:`~lrs_rec.serving.resp_pipe.RespPipe`'s connection,
which has ``CLIENT TRACKING ON`` (RESP3). Redis then remembers that this connection read those keys
and, when any client (this process or another) modifies one — an onboarding write, an erasure, a
publish or prune, a FLUSHALL — it pushes an ``invalidate`` message on that same connection, in order
with the replies. The pipe hands a reply to :meth:`UserCache.put` and a push to
:meth:`UserCache.invalidate` in the order they arrive, so a value is never cached after the
invalidation that makes it stale. The cache is emptied whenever that connection closes or fails (its
invalidations could be lost), is only used while the connection has shown life within one Redis
timeout (a silent connection falls back to reading Redis), and writes made through this process
(onboarding, erasure) also drop the user at once (:meth:`drop_user`).

Bounded: at most ``max_entries`` users (least recently used evicted first), ≈ 0.5 KB each with
20-rating histories; ``lrs-rec serve --user-cache N`` (0: off).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

DEFAULT_MAX_ENTRIES = 100_000

Row = tuple[bytes | None, bytes | None]
# (version, user id) -> (record, history, has_history, params key, history key)
_Entry = tuple[bytes | None, bytes | None, bool, bytes, bytes]


class UserCache:
    """``get(version, user_id, with_history)`` -> the cached ``(record, history)`` or None."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._rows: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._by_key: dict[bytes, set[tuple[str, str]]] = {}
        self._versions: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0  # entries dropped by invalidation (tests, metrics)

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, version: str, user_id: str, with_history: bool) -> Row | None:
        entry = self._rows.get((version, user_id))
        if entry is None or (with_history and not entry[2]):
            self.misses += 1
            return None
        self._rows.move_to_end((version, user_id))
        self.hits += 1
        return entry[0], (entry[1] if with_history else None)

    def put(
        self,
        version: str,
        user_id: str,
        keys: tuple[bytes, bytes],
        record: bytes | None,
        history: bytes | None,
        has_history: bool,
    ) -> None:
        """Cache a row just read (called by the pipe in stream order, see the module doc)."""
        ck = (version, user_id)
        old = self._rows.pop(ck, None)
        if old is not None:
            self._unlink(ck, old)
        elif len(self._rows) >= self.max_entries:
            victim, entry = self._rows.popitem(last=False)
            self._unlink(victim, entry)
        self._rows[ck] = (record, history, has_history, keys[0], keys[1])
        self._versions.add(version)
        for key in keys:
            users = self._by_key.get(key)
            if users is None:
                self._by_key[key] = {ck}
            else:
                users.add(ck)

    def _unlink(self, ck: tuple[str, str], entry: _Entry) -> None:
        for key in (entry[3], entry[4]):
            users = self._by_key.get(key)
            if users is not None:
                users.discard(ck)
                if not users:
                    del self._by_key[key]

    def invalidate(self, keys: list[bytes] | None) -> None:
        """Redis says ``keys`` changed (None: everything, e.g. FLUSHALL or a lost connection)."""
        if keys is None:
            self.invalidations += len(self._rows)
            self.clear()
            return
        for key in keys:
            for ck in self._by_key.pop(key, ()):
                entry = self._rows.pop(ck, None)
                if entry is not None:
                    self.invalidations += 1
                    self._unlink(ck, entry)

    def drop_user(self, user_id: str) -> None:
        """Forget ``user_id`` in every version (after a write through this process)."""
        for version in list(self._versions):
            entry = self._rows.pop((version, user_id), None)
            if entry is not None:
                self._unlink((version, user_id), entry)

    def clear(self) -> None:
        self._rows.clear()
        self._by_key.clear()
        self._versions.clear()

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            "entries": len(self._rows),
            "max_entries": self.max_entries,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "invalidations": self.invalidations,
        }
