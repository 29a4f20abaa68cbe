"""Redis key layout. One place builds every key, so tests can check it byte for byte.

With the default prefix ``lrs``::

    lrs:current                     string  id of the served store version, e.g. ``v3`` (the switch)
    lrs:version_seq                 string  INCR counter that allocates version ids
    lrs:versions                    hash    version id -> JSON metadata (VersionMeta)
    lrs:erased                      hash    erased user id -> erasure time in ns (serving.erasure);
                                            outside every version, so it outlives publishes
    lrs:v3:items                    string  JSON list of the version's external item ids
    lrs:v3:onboarded                hash    external user id -> "<time_ns>:<trained index or -1>"
    lrs:v3:{b17}:p                  hash    trained users of bucket 17: field = slot (0..bucket_size-1),
                                            value = parameter record (serving.encoding)
    lrs:v3:{b17}:h                  hash    same fields, value = rating-history record
    lrs:v3:{o5}:p / lrs:v3:{o5}:h   hash    users outside the trained vocabulary (onboarded):
                                            field = external user id, bucket = crc32(id) % n_onb_buckets

A trained user with dense index u lives in bucket ``u // bucket_size`` at slot ``u % bucket_size``.
The ``{...}`` hash tag is the bucket only, so in Redis Cluster a user's parameter and history keys
share one slot (MULTI/pipelines touch one node) in every version.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

DEFAULT_PREFIX = "lrs"


def _check_version(version: str) -> str:
    if not version or any(c in version for c in ":{} \t\r\n"):
        raise ValueError(f"invalid store version id {version!r}")
    return version


@dataclass(frozen=True)
class KeyLayout:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "{} \t\r\n"):
            raise ValueError(f"invalid key prefix {self.prefix!r}")

    # -- global keys --------------------------------------------------------------------------------
    @property
    def current(self) -> bytes:
        return f"{self.prefix}:current".encode()

    @property
    def version_seq(self) -> bytes:
        return f"{self.prefix}:version_seq".encode()

    @property
    def versions(self) -> bytes:
        return f"{self.prefix}:versions".encode()

    @property
    def erased(self) -> bytes:
        return f"{self.prefix}:erased".encode()

    # -- per-version keys ---------------------------------------------------------------------------
    def items(self, version: str) -> bytes:
        return f"{self.prefix}:{_check_version(version)}:items".encode()

    def onboarded(self, version: str) -> bytes:
        return f"{self.prefix}:{_check_version(version)}:onboarded".encode()

    def params(self, version: str, bucket: int) -> bytes:
        return f"{self.prefix}:{_check_version(version)}:{{b{int(bucket)}}}:p".encode()

    def history(self, version: str, bucket: int) -> bytes:
        return f"{self.prefix}:{_check_version(version)}:{{b{int(bucket)}}}:h".encode()

    def onb_params(self, version: str, bucket: int) -> bytes:
        return f"{self.prefix}:{_check_version(version)}:{{o{int(bucket)}}}:p".encode()

    def onb_history(self, version: str, bucket: int) -> bytes:
        return f"{self.prefix}:{_check_version(version)}:{{o{int(bucket)}}}:h".encode()


def trained_slot(user_index: int, bucket_size: int) -> tuple[int, bytes]:
    """(bucket, hash field) of a trained user: the field is the slot as ASCII digits, which Redis
    stores as a small integer inside a listpack (1 byte for slots < 128)."""
    return user_index // bucket_size, str(user_index % bucket_size).encode()


def onboarded_slot(user_id: str, n_buckets: int) -> tuple[int, bytes]:
    """(bucket, hash field) of a user outside the trained vocabulary: crc32 of the UTF-8 id."""
    raw = user_id.encode("utf-8")
    return zlib.crc32(raw) % n_buckets, raw
