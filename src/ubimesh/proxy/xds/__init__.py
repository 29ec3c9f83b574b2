"""Envoy v3 configuration in, runtime snapshots out. The only proxy package that imports protobuf."""
