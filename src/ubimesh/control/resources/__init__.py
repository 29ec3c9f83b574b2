"""The control plane's resources: the model, loading and validation (docs/control-plane.md
section 1; every kind and field in docs/resources.md).

``parse_documents``/``load_files`` read YAML or JSON into validated ``Resource`` objects with
defaults filled; ``validate_set`` checks the references between the resources of a set;
``effective_mesh`` gives the Mesh in force. Every problem is a ``ResourceError`` naming the
file, the resource, the field, the value and what is expected; all of them are raised
together as one ``ResourceErrors``.
"""

from ubimesh.control.resources.crossref import overlay, validate_set
from ubimesh.control.resources.errors import MISSING, ResourceError, ResourceErrors
from ubimesh.control.resources.kinds import KINDS, KindInfo, UnknownKindError, resolve_kind
from ubimesh.control.resources.loader import load_files, parse_documents, validate_document
from ubimesh.control.resources.mesh import default_mesh, effective_mesh, spiffe_id
from ubimesh.control.resources.model import DEFAULT_NAMESPACE, Key, Resource
from ubimesh.control.resources.scalars import parse_duration

__all__ = [
    "DEFAULT_NAMESPACE",
    "KINDS",
    "MISSING",
    "Key",
    "KindInfo",
    "Resource",
    "ResourceError",
    "ResourceErrors",
    "UnknownKindError",
    "default_mesh",
    "effective_mesh",
    "load_files",
    "overlay",
    "parse_documents",
    "parse_duration",
    "resolve_kind",
    "spiffe_id",
    "validate_document",
    "validate_set",
]
