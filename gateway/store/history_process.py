"""The PostgreSQL history's writes, in a process of their own at a lower priority.

Writing a batch costs CPU that has nothing to do with answering calls: reading the stored rows
it replaces, summing the board's figures, asyncpg's encoding (measured: +0.25 ms of node CPU
per call, which showed in the call path's p99 on a busy machine). So a node hands each batch
to a child process over a pipe, as one JSON line, and the child writes it
(``PostgresHistory.put``) and answers ``ok`` or ``error <why>``. The node's
``HistoryWriter`` keeps every call until that answer, so a child that fails, hangs or is killed
costs a retry, never a row (a batch written twice is written once: the newest version of a
call replaces the stored one, and the sums are corrected from the row it replaces).

The child runs at ``WRITER_NICENESS``: on a machine it shares with the node, the node's loop
wins the CPU whenever both want it. It ignores SIGINT and SIGTERM (a node stopping writes
what is pending through it) and exits when its stdin closes, so it never outlives its node.

Run as ``python -m gateway.store.history_process``; the database URL is the first line on
its stdin (not its command line, which any local user can read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

import msgspec

from gateway.core.errors import StoreUnavailable
from gateway.core.history import HistoryRow
from gateway.store.history import COLUMNS, PostgresHistory, row_values

log = logging.getLogger(__name__)

WRITER_NICENESS = 10
START_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 60.0
"""A batch not answered by then: the child is killed, and the batch tried again by a new one."""
STOP_TIMEOUT_S = 5.0
MAX_LINE = 64 * 1024 * 1024
"""The longest batch line either side reads (200 calls with long timelines stay far below)."""

_encode = msgspec.json.Encoder().encode
_decode_rows = msgspec.json.Decoder(list[tuple[Any, ...]]).decode


def encode_batch(rows: Sequence[HistoryRow]) -> bytes:
    return _encode([row_values(r) for r in rows]) + b"\n"


def decode_batch(line: bytes) -> list[HistoryRow]:
    rows = _decode_rows(line)
    if any(len(r) != len(COLUMNS) for r in rows):
        raise ValueError(f"a row is not {len(COLUMNS)} columns")
    return [HistoryRow(*r) for r in rows]


class HistoryProcess:
    """The node's side: ``put`` sends a batch to the child and waits for its answer, starting
    the child first when there is none (the first batch, or after one died)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.started = 0
        """Children started so far (1 while none has failed)."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the child now, not with the first batch: a child that cannot start is seen
        as the node starts, and its CPU is watched from then on (bench/history.py)."""
        async with self._lock:
            if self._process is None:
                await self._start()

    async def put(self, rows: Sequence[HistoryRow]) -> None:
        async with self._lock:  # one batch on the pipe at a time: its answer is the next line
            process = self._process or await self._start()
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(encode_batch(rows))
                await process.stdin.drain()
                answer = await asyncio.wait_for(process.stdout.readline(), REPLY_TIMEOUT_S)
            except (OSError, TimeoutError) as e:
                await self._discard(process)
                raise StoreUnavailable(f"call history writer: {e!r}") from e
            except asyncio.CancelledError:
                # Its answer would be read as the next batch's: this child goes, and the
                # batch (still the writer's) is written by the next one.
                self._process = None
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                raise
            if answer == b"ok\n":
                return
            if not answer.startswith(b"error "):
                await self._discard(process)
                raise StoreUnavailable(f"call history writer exited ({answer[:200]!r})")
            raise StoreUnavailable(answer[6:].decode(errors="replace").strip())

    async def _start(self) -> asyncio.subprocess.Process:
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.store.history_process",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=MAX_LINE,
            )
        except OSError as e:  # out of descriptors or memory: the batch waits and is retried
            raise StoreUnavailable(f"call history writer could not start: {e}") from e
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(self._url.encode() + b"\n")
        try:
            ready = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            ready = b""
        if ready != b"ready\n":
            await self._discard(process)
            raise StoreUnavailable(
                f"call history writer did not start ({ready[:200].decode(errors='replace')})"
            )
        self._process = process
        self.started += 1
        log.info("call history writer started (pid %d)", process.pid)
        return process

    async def _discard(self, process: asyncio.subprocess.Process) -> None:
        if process is self._process:
            self._process = None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()

    async def close(self) -> None:
        async with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            assert process.stdin is not None
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


def _say(out: BinaryIO, line: bytes) -> None:
    out.write(line.replace(b"\n", b" ") + b"\n")
    out.flush()


async def _serve(reader: asyncio.StreamReader, out: BinaryIO) -> None:
    history = PostgresHistory((await reader.readline()).decode().strip())
    with contextlib.suppress(StoreUnavailable):  # else at the first batch, which says why
        await history.connect()
    _say(out, b"ready")
    try:
        while line := await reader.readline():
            try:
                # Connected here if the database was down when the child started (the node
                # retries its batches meanwhile); the pool reconnects by itself after that.
                await history.connect()
                await history.put(decode_batch(line))
            except (StoreUnavailable, ValueError, msgspec.DecodeError) as e:
                _say(out, b"error " + str(e).encode())
            else:
                _say(out, b"ok")
    finally:
        await history.close()


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await _serve(reader, sys.stdout.buffer)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        os.nice(WRITER_NICENESS)
    except OSError as e:  # a system-call filter that forbids it: the writes matter more
        log.warning("call history writer runs at its node's priority: %s", e)
    asyncio.run(_main())


if __name__ == "__main__":
    main()
