"""Client API keys: kept only as sha256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ClientKeys:
    digests: tuple[bytes, ...]

    @classmethod
    def from_plain(cls, keys: list[str]) -> ClientKeys:
        return cls(tuple(_digest(k) for k in keys if k))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, key: str) -> bool:
        """True if `key` is one of ours. Compares against every digest, so timing says nothing."""
        candidate = _digest(key)
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(candidate, digest)
        return found

    @staticmethod
    def client_id(key: str) -> str:
        """A stable, non-secret id for a caller (for sticky routing and logs)."""
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16] if key else "anonymous"
