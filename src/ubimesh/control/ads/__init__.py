"""The ADS server of the control plane (docs/control-plane.md section 4).

``SnapshotCache`` holds each node's xDS (an ``XdsSet`` from the compiler); ``AdsServer`` serves
it over ``AggregatedDiscoveryService/StreamAggregatedResources``, state of the world, to ubimesh
proxies and Envoys alike.
"""

from ubimesh.control.ads.cache import EMPTY_VERSION, Snapshot, SnapshotCache
from ubimesh.control.ads.server import AdsServer, NodeInfo
from ubimesh.control.ads.types import CDS, EDS, LDS, PUSH_ORDER, RDS, SDS, XdsLike

__all__ = [
    "CDS",
    "EDS",
    "EMPTY_VERSION",
    "LDS",
    "PUSH_ORDER",
    "RDS",
    "SDS",
    "AdsServer",
    "NodeInfo",
    "Snapshot",
    "SnapshotCache",
    "XdsLike",
]
