"""The built-in trace collector: Zipkin v2 and OTLP/HTTP ingest, SQLite storage, Zipkin's
v2 query API. It runs alone (``ubimesh collector``) or mounted on another aiohttp app
(:func:`ubimesh.collector.api.add_collector`); the proxy never imports it.

- :mod:`.model`: decode and validate Zipkin v2 JSON and OTLP/JSON spans into storage rows;
- :mod:`.store`: SQLite (WAL) with retention, and the queries;
- :mod:`.writer`: the bounded queue and the background thread that writes batches;
- :mod:`.api`: the HTTP routes (ingest and query);
- :mod:`.server`: ``ubimesh collector``.
"""
