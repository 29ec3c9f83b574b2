"""The ubimesh control plane: resources, store, compiler, ADS, API (docs/control-plane.md)."""
