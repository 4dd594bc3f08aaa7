"""Faults of a real PostgreSQL for tests: pause it (SIGSTOP) as a hung server would be.

Only for a server of the test's own (the `private_pg` fixture), never the shared one.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from gateway.embedded import EmbeddedPostgres


def server_pids(data_dir: Path) -> list[int]:
    """Return the postmaster's pid and its children's (the backends), or [] if it is down."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return []
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # /proc/<pid>/stat: pid (comm) state ppid ...; comm may hold spaces.
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == postmaster:
                    children.append(int(entry.name))
    return [postmaster, *children]


def signal_server(data_dir: Path, signum: signal.Signals) -> None:
    """Send ``signum`` to every process of the server."""
    for pid in server_pids(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextlib.contextmanager
def paused(server: EmbeddedPostgres) -> Iterator[None]:
    """Stop every process of the server for the block (connections hang, nothing fails)."""
    pids = server_pids(server.data_dir)
    assert len(pids) > 1
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
