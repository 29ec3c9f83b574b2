"""The routing core of the proxy: pure functions and objects compiled once per configuration.

* :mod:`.table`: ``RouteTable`` (virtual host selection, route matching, header rule order);
* :mod:`.headers`: compiled header rules (``HeaderRules``) and their evaluation;
* :mod:`.formatter`: Envoy's ``%COMMAND%`` substitution format for header values;
* :mod:`.redirect`: path and host rewrites, redirect locations;
* :mod:`.weighted`: weighted cluster selection;
* :mod:`.hashing`: route hash policies.

Path normalization (an HCM option, applied before routing) is in :mod:`ubimesh.proto.path`.
"""

from ubimesh.proxy.routing.formatter import (
    CompiledFormat,
    FormatContext,
    FormatError,
    compile_format,
)
from ubimesh.proxy.routing.hashing import compute_hash
from ubimesh.proxy.routing.headers import HeaderRuleError, HeaderRules
from ubimesh.proxy.routing.redirect import (
    RewriteError,
    redirect_location,
    rewrite_authority,
    rewrite_path,
)
from ubimesh.proxy.routing.table import RouteConfigError, RouteTable
from ubimesh.proxy.routing.weighted import pick_weighted

__all__ = [
    "CompiledFormat",
    "FormatContext",
    "FormatError",
    "HeaderRuleError",
    "HeaderRules",
    "RewriteError",
    "RouteConfigError",
    "RouteTable",
    "compile_format",
    "compute_hash",
    "pick_weighted",
    "redirect_location",
    "rewrite_authority",
    "rewrite_path",
]
