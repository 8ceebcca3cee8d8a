"""A fault-injecting TCP proxy for the chaos suite (asyncio, in a background thread, stdlib only).

    proxy = FaultProxy("127.0.0.1", 5432, name="pg").start()   # listens on proxy.port
    proxy.set_mode("cut")    # every open connection reset (RST), new ones refused
    proxy.set_mode("pass")   # listening again, bytes flow

Modes (``set_mode`` returns once the mode is in effect):

- ``pass``: accept and forward both ways.
- ``stall``: a black hole that keeps connections up: accepted connections (old and new) forward
  nothing; the bytes wait in the kernel's buffers (the sender's TCP window fills), nothing is
  closed. New connections are accepted but reach the upstream only when the stall ends. Back to
  ``pass``, everything held flows on, as after a network partition heals.
- ``cut``: every open connection is reset (SO_LINGER 0, so the peer reads ECONNRESET) and the
  listening socket is closed, so new connections are refused (ECONNREFUSED): a server that died.
- ``refuse``: the listening socket is closed (ECONNREFUSED for new connections); connections
  already open keep working.
- ``strand``: the connections open now go silent for good (no byte either way, no FIN, no RST: a
  peer that vanished behind a NAT or a failed-over address), while new connections work normally.
  Only a client's own timeouts or keepalives get it out; ``release_stranded()`` finally resets them
  (what the kernel would do hours later). The mode itself stays ``pass`` for new connections.

Counters (``stats()``): connections accepted, reset by ``cut``, bytes each way, mode changes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

MODES = ("pass", "stall", "cut", "refuse", "strand")

__all__ = ["MODES", "FaultProxy", "free_port"]


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A port free a moment ago, below the kernel's ephemeral range (32768+), so that a listener
    closed for a ``cut``/``refuse`` fault is not taken over by some client's outgoing connection."""
    import random

    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}..{high}")


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with an RST (SO_LINGER on, timeout 0) instead of a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    stranded: bool = False


class FaultProxy:
    """One listening port forwarding to ``target_host:target_port`` with injectable faults."""

    def __init__(self, target_host: str, target_port: int, *, name: str = "proxy",
                 listen_host: str = "127.0.0.1", listen_port: int | None = None):
        self.name = name
        self.target = (target_host, target_port)
        self.host = listen_host
        self.port = listen_port or free_port()
        self.mode = "pass"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._flowing: asyncio.Event | None = None
        self._conns: set[_Conn] = set()
        self._stats = {"accepted": 0, "reset_by_cut": 0, "upstream_errors": 0, "bytes_up": 0, "bytes_down": 0,
                       "listen_retries": 0, "stranded": 0, "stranded_closed_by_client": 0}
        self._never: asyncio.Event | None = None  # never set: what a stranded connection waits on
        self.history: list[tuple[float, str]] = []

    # -- control (any thread) ---------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "FaultProxy":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._never = asyncio.Event()
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"faultproxy-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise RuntimeError(f"proxy {self.name} could not listen on {self.address}: {failure[0]}")
        self.history.append((time.time(), "pass"))
        return self

    def set_mode(self, mode: str, timeout: float = 30) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        future = asyncio.run_coroutine_threadsafe(self._set_mode(mode), self._loop)
        future.result(timeout)
        self.history.append((time.time(), mode))

    def stats(self) -> dict:
        stranded_open = sum(1 for c in list(self._conns) if c.stranded)
        return {**self._stats, "open": len(self._conns), "stranded_open": stranded_open, "mode": self.mode}

    def release_stranded(self, timeout: float = 30) -> int:
        """Reset (RST) the stranded connections still open; returns how many."""
        return asyncio.run_coroutine_threadsafe(self._release_stranded(), self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is None or not self._loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # -- inside the loop --------------------------------------------------------------------------
    async def _listen(self) -> None:
        for attempt in range(100):
            try:
                self._server = await asyncio.start_server(
                    self._handle, self.host, self.port, reuse_address=True, backlog=512
                )
                return
            except OSError:
                if attempt == 99:
                    raise
                self._stats["listen_retries"] += 1
                await asyncio.sleep(0.1)

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _set_mode(self, mode: str) -> None:
        if mode in ("pass", "stall", "strand") and self._server is None:
            await self._listen()
        if mode == "strand":
            for conn in self._conns:
                if not conn.stranded:
                    conn.stranded = True
                    self._stats["stranded"] += 1
            self._flowing.set()
            self.mode = "pass"  # new connections flow
            return
        if mode == "pass":
            self._flowing.set()
        if mode == "stall":
            self._flowing.clear()
        if mode in ("cut", "refuse"):
            await self._unlisten()
            self._flowing.set()  # nothing new arrives; what stays open (refuse) flows
        if mode == "cut":
            for conn in list(self._conns):
                self._stats["reset_by_cut"] += 1
                _reset(conn.client)
                _reset(conn.upstream)
                for task in conn.tasks:
                    task.cancel()
            self._conns.clear()
        self.mode = mode

    async def _release_stranded(self) -> int:
        count = 0
        for conn in [c for c in self._conns if c.stranded]:
            _reset(conn.client)
            _reset(conn.upstream)
            for task in conn.tasks:
                task.cancel()
            self._conns.discard(conn)
            count += 1
        return count

    async def _shutdown(self) -> None:
        await self._unlisten()
        for conn in list(self._conns):
            _reset(conn.client)
            _reset(conn.upstream)
            for task in conn.tasks:
                task.cancel()
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats["accepted"] += 1
        conn = _Conn(client=writer)
        self._conns.add(conn)
        try:
            await self._flowing.wait()  # a stalled network: the upstream is reached only when it heals
            if conn not in self._conns:  # cut while waiting
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self._stats["upstream_errors"] += 1
                _reset(writer)
                return
            conn.upstream = up_writer
            if conn not in self._conns:
                _reset(up_writer)
                return
            conn.tasks = [
                asyncio.ensure_future(self._pipe(reader, up_writer, "bytes_up", conn)),
                asyncio.ensure_future(self._pipe(up_reader, writer, "bytes_down", conn)),
            ]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            for task in conn.tasks:
                task.cancel()
            if conn in self._conns:
                self._conns.discard(conn)
                for side in (writer, conn.upstream):
                    if side is not None:
                        try:
                            side.close()
                        except Exception:  # noqa: BLE001
                            pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str,
                    conn: _Conn) -> None:
        try:
            while True:
                await self._flowing.wait()
                if conn.stranded:
                    await self._stranded(reader, counter == "bytes_up")
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # a stall that began during the read holds this chunk too
                if conn.stranded:
                    await self._stranded(reader, counter == "bytes_up")
                writer.write(data)
                await writer.drain()
                self._stats[counter] += len(data)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass

    async def _stranded(self, reader: asyncio.StreamReader, from_client: bool) -> None:
        """Forward nothing, ever: what arrives is read and dropped (so that a close is seen); the
        connection ends when released or closed by either side."""
        while True:
            if not await reader.read(65536):
                if from_client:
                    self._stats["stranded_closed_by_client"] += 1
                raise ConnectionResetError("stranded connection closed")


if __name__ == "__main__":  # a manual proxy: python faultproxy.py TARGET_PORT [LISTEN_PORT]
    import sys

    proxy = FaultProxy("127.0.0.1", int(sys.argv[1]), listen_port=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    proxy.start()
    print(f"listening on {proxy.address}; type a mode ({', '.join(MODES)}) and Enter", flush=True)
    for line in sys.stdin:
        if line.strip() in MODES:
            proxy.set_mode(line.strip())
            print(proxy.stats(), flush=True)
