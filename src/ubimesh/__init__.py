"""ubimesh: a service mesh that runs anywhere, with an Envoy-compatible proxy written in Python."""

__version__ = "0.1.0"
