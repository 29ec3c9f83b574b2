"""Runtime configuration snapshots: frozen dataclasses, no protobuf, no I/O."""
