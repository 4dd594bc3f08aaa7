"""Group commit: many small write operations share one transaction and one commit.

A commit waits for the write-ahead log to reach disk, which costs far more than the
statements themselves (see the performance notes: one commit per message caps out near
6,000/s here). Callers :meth:`~GroupCommitter.submit` an operation, an async function of
a connection; writer tasks take whatever is queued (up to ``max_batch``), run it all in
one transaction, commit once, and only then resolve every caller's future. So a caller
that has its result knows its write is durable.

Operations of one kind that can be written together (`Batchable`: the state changes of
many vends) are, in one set-based statement per kind and batch: every statement is a round
trip, and on this machine a round trip's write costs more CPU than the statement (measured:
a fifth of the gateway's CPU per vend was asyncpg's socket writes). They carry a key (the
vend id); operations with the same key keep their order, and a plain operation is a barrier
that everything queued before it runs ahead of. What must follow an operation in its
transaction when it succeeds (a vend result's dispense record) is batchable too: ``after``
names a `Batchable` that gets the pairs (argument, result) of every such operation of the
segment in one call.

If any operation in a batch raises, the batch is rolled back and its operations are
retried one per transaction, so one bad operation fails alone. If the database is
unreachable every caller gets :class:`~gateway.errors.DatabaseUnavailableError`
(retriable). The queue is bounded: when it is full, ``submit`` waits up to its timeout
and then raises :class:`~gateway.errors.OverloadedError` (house style #8).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg

from gateway.errors import DatabaseUnavailableError, OverloadedError
from gateway.logs import get_logger
from gateway.store.db import Conn

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
Op = Callable[[Conn], Awaitable[T]]


@dataclass(frozen=True, slots=True, eq=False)
class Batchable(Generic[A, T]):
    """A kind of operation that many callers' arguments can share one statement for.

    ``run_many`` takes arguments with distinct keys and returns one result each, in order;
    a failed batch retries each operation alone, with a list of one.
    """

    name: str
    run_many: Callable[[Conn, list[A]], Awaitable[list[T]]]


log = get_logger("gateway.store.writer")

#: Errors that mean "the database is not there", as opposed to "this statement is wrong".
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,  # class 08: connection exceptions
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, query cancelled
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # 25006: a standby during failover
)


def unavailable(exc: BaseException) -> DatabaseUnavailableError | None:
    """Return the retriable error for a database failure that is not the statement's fault."""
    if isinstance(exc, _UNAVAILABLE):
        error = DatabaseUnavailableError(f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    return None


@dataclass(slots=True)
class _Item(Generic[T]):
    op: Op[T] | None
    future: asyncio.Future[T]
    queued_at: float = field(default_factory=time.monotonic)
    # A batchable operation instead of `op`: its kind, key, argument, and what to run after
    # it in the same transaction when its result is not None: a kind taking (its argument,
    # the result), and that argument.
    kind: Batchable[Any, T] | None = None
    key: str = ""
    arg: Any = None
    after: tuple[Batchable[tuple[Any, T], Any], Any] | None = None


@dataclass(slots=True)
class WriterStats:
    """Counters for metrics and benchmarks."""

    batches: int = 0
    ops: int = 0
    retried_alone: int = 0
    failed: int = 0
    largest_batch: int = 0


class GroupCommitter:
    """Run write operations in shared transactions; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 256,
        queue_size: int = 10_000,
        submit_timeout_s: float = 5.0,
        writers: int = 1,
    ) -> None:
        if writers < 1:
            raise ValueError("a GroupCommitter needs at least one writer")
        self._writers = writers
        self._pool = pool
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item[Any]] = asyncio.Queue(queue_size)
        self._submit_timeout_s = submit_timeout_s
        self.stats = WriterStats()

    @property
    def depth(self) -> int:
        """Operations waiting for a writer."""
        return self._queue.qsize()

    async def submit(self, op: Op[T]) -> T:
        """Queue ``op`` and return its result once its transaction has committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return await self._enqueue(_Item(op, future))

    async def submit_batchable(
        self,
        kind: Batchable[A, T],
        key: str,
        arg: A,
        *,
        after: tuple[Batchable[tuple[B, Any], Any], B] | None = None,
    ) -> T:
        """Queue one ``kind`` operation on ``arg``; return its result once committed.

        With ``after=(then, b)``, ``then.run_many`` gets ``(b, result)`` in the same
        transaction, unless the result is None: one call for all such operations of a
        segment (one statement per kind, as for the operations themselves).
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        return await self._enqueue(_Item(None, future, kind=kind, key=key, arg=arg, after=after))

    async def _enqueue(self, item: _Item[T]) -> T:
        future = item.future
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the put completes (gh-86296), and the caller would never stop.
            try:
                async with asyncio.timeout(self._submit_timeout_s):
                    await self._queue.put(item)
            except TimeoutError:
                raise OverloadedError("database write queue", self._queue.maxsize) from None
        return await future

    async def run(self) -> None:
        """Run the writer loops (``writers`` of them, each on its own connection); forever.

        With several, a batch starts while another commits, so an operation waits for one
        commit, not for the one in progress and then its own. Operations of one key are kept
        in order within a batch; callers that need order across batches (one vend's moves)
        wait for each before submitting the next, as the dispatcher does. A deadlock between
        two writers' batches fails one, which is then retried one operation at a time.
        """
        if self._writers == 1:
            await self._loop()
            return
        async with asyncio.TaskGroup() as tasks:
            for index in range(self._writers):
                tasks.create_task(self._loop(), name=f"gateway.store.writer.{index}")

    async def _loop(self) -> None:
        """Take a batch, commit it, resolve its futures; forever."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.cancel()
                raise
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def read(self, op: Op[T]) -> T:
        """Run a read-only ``op`` on a pool connection now, without waiting for a commit."""
        try:
            async with self._pool.acquire() as conn:
                return await op(conn)
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailableError(f"{type(exc).__name__}: {exc}") from exc

    async def drain(self) -> None:
        """Wait until everything submitted so far has been committed or failed."""
        await self._queue.join()

    async def _commit(self, batch: list[_Item[Any]]) -> None:
        live = [item for item in batch if not item.future.cancelled()]
        if not live:
            return
        self.stats.batches += 1
        self.stats.ops += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        try:
            results = await self._run_batch(live)
        except _UNAVAILABLE as exc:
            error = DatabaseUnavailableError(f"{type(exc).__name__}: {exc}")
            for item in live:
                _fail(item, error, exc)
            self.stats.failed += len(live)
            log.warning("write_batch_unavailable", ops=len(live), error=str(error))
            return
        except Exception:  # noqa: BLE001  (one bad op: isolate it below)
            await self._one_by_one(live)
            return
        for item, result in zip(live, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    async def _run_batch(self, items: list[_Item[Any]]) -> list[Any]:
        async with self._pool.acquire() as conn, conn.transaction():
            results: list[Any] = [None] * len(items)
            segment: list[int] = []  # batchable items with distinct keys, not yet run
            keys: set[str] = set()
            for index, item in enumerate(items):
                if item.op is not None:
                    await _run_segment(conn, items, segment, results)
                    keys.clear()
                    results[index] = await item.op(conn)
                    continue
                if item.key in keys:
                    await _run_segment(conn, items, segment, results)
                    keys.clear()
                segment.append(index)
                keys.add(item.key)
            await _run_segment(conn, items, segment, results)
            return results

    async def _one_by_one(self, items: list[_Item[Any]]) -> None:
        self.stats.retried_alone += len(items)
        for item in items:
            try:
                (result,) = await self._run_batch([item])
            except _UNAVAILABLE as exc:
                _fail(item, DatabaseUnavailableError(f"{type(exc).__name__}: {exc}"), exc)
                self.stats.failed += 1
            except Exception as exc:  # noqa: BLE001  (handed to the caller, who decides)
                if not item.future.done():
                    item.future.set_exception(exc)
                self.stats.failed += 1
            else:
                if not item.future.done():
                    item.future.set_result(result)


async def _run_segment(
    conn: Conn, items: list[_Item[Any]], segment: list[int], results: list[Any]
) -> None:
    """Run a segment's batchable items, one statement per kind; then their ``after``s, likewise."""
    if not segment:
        return
    kinds: dict[Batchable[Any, Any], list[int]] = {}
    for index in segment:
        kind = items[index].kind
        assert kind is not None  # noqa: S101  (only batchable items are in a segment)
        kinds.setdefault(kind, []).append(index)
    for kind, indices in kinds.items():
        outcomes = await kind.run_many(conn, [items[i].arg for i in indices])
        for index, outcome in zip(indices, outcomes, strict=True):
            results[index] = outcome
    afters: dict[Batchable[Any, Any], list[tuple[Any, Any]]] = {}
    for index in segment:
        after, result = items[index].after, results[index]
        if after is not None and result is not None:
            afters.setdefault(after[0], []).append((after[1], result))
    for kind, pairs in afters.items():
        await kind.run_many(conn, pairs)
    segment.clear()


def _fail(item: _Item[Any], error: Exception, cause: BaseException) -> None:
    if not item.future.done():
        error.__cause__ = cause
        item.future.set_exception(error)
