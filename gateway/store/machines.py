"""The machines aggregate: the registry of machines the gateway may vend on."""

from __future__ import annotations

from gateway.store.db import Conn


async def register(conn: Conn, machine_id: str) -> bool:
    """Register a machine; return False if it was registered already."""
    created = await conn.fetchval(
        "INSERT INTO machines (machine_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true",
        machine_id,
    )
    return bool(created)


async def exists(conn: Conn, machine_id: str) -> bool:
    """Return whether ``machine_id`` is registered."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM machines WHERE machine_id = $1)", machine_id
        )
    )


async def all_ids(conn: Conn) -> list[str]:
    """Return every registered machine id, sorted."""
    return [r["machine_id"] for r in await conn.fetch("SELECT machine_id FROM machines ORDER BY 1")]
