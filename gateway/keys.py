"""Machine frame keys, derived on demand from the master secret and cached."""

from __future__ import annotations

import sys

from protocols.codec import FrameKey, derive_machine_key


class KeyRing:
    """Derive and cache each machine's :class:`~protocols.codec.FrameKey` (SPEC §4.3).

    The cache is a plain dict of at most ``cache_size`` keys, the oldest derived dropped
    first: about 40 bytes an entry where ``functools.lru_cache`` took about 100 (its link
    object), and a fleet within the bound is never evicted, whatever the order of its frames.
    Ids are interned: the dict's key is the string the uplink, presence and the machine
    directory keep for the machine already.
    """

    def __init__(self, master_secret: bytes, *, cache_size: int = 65_536) -> None:
        derive_machine_key(master_secret, "probe")  # refuse a short secret at start-up
        self._master = master_secret
        self._size = max(1, cache_size)
        self._keys: dict[str, FrameKey] = {}

    def key(self, machine_id: str) -> FrameKey:
        """Return the frame key of ``machine_id``."""
        key = self._keys.get(machine_id)
        if key is None:
            key = FrameKey.derive(self._master, machine_id)
            if len(self._keys) >= self._size:
                del self._keys[next(iter(self._keys))]
            self._keys[sys.intern(machine_id)] = key
        return key
