"""Machine frame keys, derived on demand from the master secret and cached."""

from __future__ import annotations

from functools import lru_cache

from protocols.codec import FrameKey, derive_machine_key


class KeyRing:
    """Derive and cache each machine's :class:`~protocols.codec.FrameKey` (SPEC §4.3)."""

    def __init__(self, master_secret: bytes, *, cache_size: int = 65_536) -> None:
        derive_machine_key(master_secret, "probe")  # refuse a short secret at start-up
        self._master = master_secret
        self.key = lru_cache(maxsize=cache_size)(self._derive)

    def _derive(self, machine_id: str) -> FrameKey:
        return FrameKey.derive(self._master, machine_id)
