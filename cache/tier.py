"""The interface the byte tiers (Redis, disk) share, so the store can walk them in order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class ByteTier(Protocol):
    """A tier that stores serialized values (see cache.serde) by key.

    Contract: never raises on a backend failure; a failed read is a miss and a
    failed write is dropped (counted in stats as `errors`).
    """

    name: str

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes | bytearray]:
        """Values of the keys present; missing keys are absent."""
        ...

    def put(self, key: str, value: bytes) -> None: ...

    def put_many(self, items: Mapping[str, bytes]) -> None: ...

    def delete(self, key: str) -> None: ...

    def clear(self) -> None:
        """Delete every value this tier owns (and nothing else)."""
        ...

    def usage(self) -> dict:
        """Occupancy numbers for stats (entries, bytes, budget, ...)."""
        ...

    def close(self) -> None: ...
