"""TLS for the proxy: contexts from ``TlsContext`` snapshots, peer verification, the
server-side upgrade of accepted connections. Importing this package loads neither ``ssl`` nor
``cryptography``: they load when the first TLS context is built (the idle-RSS budget)."""
