"""Small example HTTP services for the demo: each answers with its name and what it received.

Run one or more: ``python examples/services.py web-dc=18081 web-cloud=18082``.
Plain asyncio on purpose: the examples do not depend on ubimesh's own code.
"""

from __future__ import annotations

import asyncio
import json
import sys


async def handle(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [tuple(h.split(":", 1)) for h in lines[1:] if ":" in h]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            body = await reader.readexactly(length) if length else b""
            answer = (
                json.dumps(
                    {
                        "service": name,
                        "method": method,
                        "path": target,
                        "host": next((v.strip() for k, v in headers if k.lower() == "host"), ""),
                        "request_id": next(
                            (v.strip() for k, v in headers if k.lower() == "x-request-id"), ""
                        ),
                        "body_bytes": len(body),
                    }
                ).encode()
                + b"\n"
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%b" % (len(answer), answer)
            )
            await writer.drain()
    except (
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        TimeoutError,
        ConnectionError,
        ValueError,
    ):
        pass
    finally:
        writer.close()


async def serve(specs: list[tuple[str, int]]) -> None:
    servers = []
    for name, port in specs:
        server = await asyncio.start_server(lambda r, w, n=name: handle(n, r, w), "127.0.0.1", port)
        servers.append(server)
        print(f"{name} listening on 127.0.0.1:{port}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str]) -> None:
    specs = []
    for arg in argv:
        name, _, port = arg.partition("=")
        specs.append((name, int(port)))
    asyncio.run(serve(specs))


if __name__ == "__main__":
    main(sys.argv[1:])
