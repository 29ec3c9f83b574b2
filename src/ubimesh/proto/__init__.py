"""Sans-I/O protocol helpers: bytes and strings in, values out; no asyncio, no sockets."""
