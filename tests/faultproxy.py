"""A fault-injecting HTTP proxy on 127.0.0.1 for the teacher-service tests.

It handles one request per connection (answers carry `Connection: close`) and plays a script of
faults, one per POST in arrival order, then passes requests through:
    "pass"     forward and relay the answer
    "500"      answer 500 without forwarding
    "429"      answer 429 with `Retry-After: RETRY_AFTER` without forwarding
    "drop"     forward (the server answers and charges), then close without answering
    "hang"     forward, then hold the answer HANG seconds (longer than the client's timeout) and close
    "slow"     forward, then relay the answer after SLOW seconds (within the client's timeout)
    "garbage"  forward, then answer 200 with a body that is not JSON
Every pass-through waits `delay` seconds before relaying. GET requests are never faulted.
"""

from __future__ import annotations

import asyncio
import threading
import time

RETRY_AFTER, HANG, SLOW = 0.3, 10.0, 0.3


def canned(status: str, body: bytes = b"", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n".encode() + body


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes] | None:
    """(request line, raw request with `Connection: close`), or None at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = [h for h in lines[1:] if not h.lower().startswith("connection:")]
    length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
    body = await reader.readexactly(length)
    raw = "\r\n".join([lines[0], *headers, "Connection: close", "", ""]).encode("latin-1") + body
    return lines[0], raw


class FaultProxy:
    def __init__(self, upstream_port: int, faults: list[str] = (), delay: float = 0.0):
        self.upstream_port, self.faults, self.delay = upstream_port, list(faults), delay
        self.seen: list[tuple[float, str, str]] = []  # (arrival time, request line, fault played)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        """Stop listening and abandon the connections still open (a held answer, say)."""

        async def shutdown() -> None:
            self.server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _forward(self, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        writer.write(raw)
        await writer.drain()
        answer = await reader.read()  # the server closes after answering (Connection: close)
        writer.close()
        return answer

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if request is None:
            writer.close()
            return
        line, raw = request
        fault = self.faults.pop(0) if line.startswith("POST") and self.faults else "pass"
        self.seen.append((time.monotonic(), line, fault))
        if fault == "500":
            writer.write(canned("500 Internal Server Error", b'{"detail": "injected"}'))
        elif fault == "429":
            writer.write(canned("429 Too Many Requests", b'{"detail": "slow down"}', f"Retry-After: {RETRY_AFTER}\r\n"))
        else:
            answer = await self._forward(raw)
            if fault == "hang":
                await asyncio.sleep(HANG)
            elif fault == "garbage":
                writer.write(canned("200 OK", b"<html>not json</html>", "Content-Type: text/html\r\n"))
            elif fault != "drop":
                await asyncio.sleep(SLOW if fault == "slow" else self.delay)
                writer.write(answer)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the client gave up (a timeout): nothing to deliver to
        writer.close()
