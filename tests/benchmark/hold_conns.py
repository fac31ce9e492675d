"""Open N keep-alive connections to 127.0.0.1:PORT, one GET on each, and hold them.

usage: python hold_conns.py PORT N
Prints "HELD <n>" once every connection has its response, then waits for SIGTERM.
Runs as its own process so its sockets and memory are not the daemon's or the harness's.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: bench\r\nUser-Agent: hold-conns\r\n\r\n"


async def open_one(port: int, gate: asyncio.Semaphore, held: list) -> None:
    async with gate:   # bounded concurrency: the listen backlog is finite
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        held.append(writer)


async def main(port: int, count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), max(hard, want)),
                                                    max(hard, want)))
    held: list = []
    gate = asyncio.Semaphore(256)
    results = await asyncio.gather(*(open_one(port, gate, held) for _ in range(count)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print("FAILED %d of %d: %r" % (len(errors), count, errors[0]), flush=True)
    print("HELD %d" % len(held), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
