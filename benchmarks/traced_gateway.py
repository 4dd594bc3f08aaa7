"""``vendgate run`` under tracemalloc, dumping a snapshot on request (for gateway_memory).

    TRACED_GATEWAY_DIR=DIR python -m benchmarks.traced_gateway [gateway.cli arguments]

Starts tracemalloc (``TRACED_GATEWAY_FRAMES`` frames a trace, default 1) before the gateway
is imported, then runs ``gateway.cli.main``. A thread watches ``DIR/request``: when that
file appears, holding a file name, it collects garbage, dumps a snapshot to ``DIR/<name>``
and removes the request. Traces cost memory and time: RSS figures come from plain runs.
(Not ``VENDGATE_*`` variables: those are the gateway's configuration.)
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

REQUEST = "request"


def _serve_snapshots(folder: Path) -> None:
    request = folder / REQUEST
    while True:
        time.sleep(0.1)
        try:
            name = request.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        if not name:
            continue  # being written
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        partial = folder / f"{name}.partial"
        snapshot.dump(str(partial))
        partial.rename(folder / name)
        request.unlink()


def main() -> int:
    """Trace, serve snapshots, run the gateway's command line."""
    folder = Path(os.environ["TRACED_GATEWAY_DIR"])
    tracemalloc.start(int(os.environ.get("TRACED_GATEWAY_FRAMES", "1")))
    threading.Thread(
        target=_serve_snapshots, args=(folder,), name="tracemalloc-snapshots", daemon=True
    ).start()
    from gateway.cli import main as gateway_main  # noqa: PLC0415  (imported while tracing)

    return gateway_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
