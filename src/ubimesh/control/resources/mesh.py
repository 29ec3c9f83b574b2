"""The mesh-wide settings in force: the set's Mesh, or the defaults when it has none."""

from __future__ import annotations

from collections.abc import Iterable

from ubimesh.control.resources.kinds import UBIMESH_V1ALPHA1
from ubimesh.control.resources.model import Resource
from ubimesh.control.resources.schema import Ctx
from ubimesh.control.resources.spec_ubimesh import MESH

#: The name of the Mesh that ``effective_mesh`` makes when a set has none.
DEFAULT_MESH_NAME = "default"


def default_mesh() -> Resource:
    """A Mesh named "default" whose spec is every default (trust domain cluster.local, ...)."""
    ctx = Ctx()
    spec = MESH.check({}, "spec", ctx)
    assert not ctx.issues, ctx.issues  # the defaults are valid by construction
    return Resource(UBIMESH_V1ALPHA1, "Mesh", DEFAULT_MESH_NAME, "", spec, source="<default>")


def effective_mesh(resources: Iterable[Resource]) -> Resource:
    """The (first) Mesh of ``resources``, or ``default_mesh()`` when there is none."""
    for resource in resources:
        if resource.kind == "Mesh":
            return resource
    return default_mesh()


def spiffe_id(mesh: Resource, namespace: str, service_account: str) -> str:
    """The identity of a workload: ``spiffe://<trustDomain>/ns/<namespace>/sa/<account>``."""
    return f"spiffe://{mesh.spec['trustDomain']}/ns/{namespace}/sa/{service_account}"
