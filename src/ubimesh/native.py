"""Compiled hot path: the request-path modules built with mypyc, used when they match the source.

The proxy's per-request work is a few hundred Python-level calls; mypyc (part of mypy) compiles
these strictly typed modules to C extensions, which cut the proxy's CPU per request by about a
third in the benchmark (docs/decisions/0002-compiled-hot-path.md). The pure-Python modules stay
the source of truth:

* ``build()`` compiles ``HOT_MODULES`` from a copy of the package into a cache directory whose
  name is a hash of every source file of the package, the Python version and the mypy version;
* ``enable()`` (called by ``ubimesh proxy`` before it imports the request path) puts that
  directory first on the subpackages' ``__path__`` when it exists. After any source change the
  hash differs, no build matches, and the proxy runs the pure-Python modules (and says so), so a
  stale build can never run.

The build also compiles ``C_EXTENSIONS``, hand-written C modules for what compiled Python
could not make cheap enough (each has a Python equivalent, used without the build, and a test
comparing the two); the hash covers their sources too.

``UBIMESH_NATIVE=0`` turns the compiled modules off; ``UBIMESH_NATIVE_DIR`` moves the cache.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("ubimesh.native")

#: The modules on the request path, compiled together (they call each other a lot).
HOT_MODULES = (
    "ubimesh/policy/rbac.py",
    "ubimesh/proxy/access_log/filters.py",
    "ubimesh/proxy/access_log/format.py",
    "ubimesh/proxy/access_log/logger.py",
    "ubimesh/proxy/access_log/sink.py",
    "ubimesh/proto/headers.py",
    "ubimesh/proxy/http/codec.py",
    "ubimesh/proxy/http/fault.py",
    "ubimesh/proxy/http/filter_chain.py",
    "ubimesh/proxy/http/local_ratelimit.py",
    "ubimesh/proxy/http/pool.py",
    "ubimesh/proxy/http/rbac.py",
    "ubimesh/proxy/http/retry.py",
    "ubimesh/proxy/http/router.py",
    "ubimesh/proxy/name_memo.py",
    "ubimesh/proxy/network/hcm_config.py",
    "ubimesh/proxy/network/http_manager.py",
    "ubimesh/proxy/tracing/batch.py",
    "ubimesh/proxy/tracing/context.py",
    "ubimesh/proxy/tracing/exporter.py",
    "ubimesh/proxy/tracing/otlp.py",
    "ubimesh/proxy/tracing/sampler.py",
    "ubimesh/proxy/tracing/span.py",
    "ubimesh/proxy/tracing/zipkin.py",
    "ubimesh/proxy/upstream/circuit_breaker.py",
    "ubimesh/proxy/upstream/host.py",
    "ubimesh/proxy/upstream/outlier.py",
    "ubimesh/telemetry/mesh_metrics.py",
    "ubimesh/telemetry/stats.py",
)

#: Hand-written C extensions of the hot path (module, source), built with the mypyc modules,
#: where the benchmark showed compiled Python to be the limit. Each has a Python equivalent
#: that its importer uses when the extension is missing, and a test comparing the two.
C_EXTENSIONS = (
    ("ubimesh.proxy.access_log._textline", "ubimesh/proxy/access_log/_textline.c"),
    ("ubimesh.proxy.tracing._zipkin_text", "ubimesh/proxy/tracing/_zipkin_text.c"),
    ("ubimesh.proxy.http._head", "ubimesh/proxy/http/_head.c"),
)

_PACKAGE_ROOT = Path(__file__).resolve().parent  # .../ubimesh
_SRC_ROOT = _PACKAGE_ROOT.parent


def _mypy_version() -> str:
    """mypy's version, read from its files: importing mypy would load its own compiled
    library (about 9 MB resident) into the proxy."""
    spec = importlib.util.find_spec("mypy")
    if spec is None or not spec.submodule_search_locations:
        return ""
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        return hashlib.sha256(version_file.read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


#: Packages the proxy never imports (a test keeps it so): their edits leave the build valid.
OUTSIDE_THE_PROXY = ("control", "cli", "agent", "collector")
#: Modules of the proxy's packages that the proxy never imports either: ``ubimesh policy``'s
#: evaluator (it compiles the mesh with the control plane's compiler), its file reader, the
#: fork-sharing helper and the usage error both use.
OUTSIDE_MODULES = (
    "policy/questions.py",
    "policy/files.py",
    "policy/split.py",
    "policy/errors.py",
)


def outside_the_proxy(rel: Path) -> bool:
    """Whether the source file ``rel`` (relative to the package) is left out of the key."""
    return rel.parts[0] in OUTSIDE_THE_PROXY or rel.as_posix() in OUTSIDE_MODULES


def source_hash() -> str:
    """A digest of every source file the proxy may import (a compiled module inlines types
    and constants of the modules it imports, so any change there invalidates the build).
    The control plane, the CLI and the agent are left out: the proxy never imports them."""
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    digest.update(_mypy_version().encode())
    sources = [*_PACKAGE_ROOT.rglob("*.py"), *_PACKAGE_ROOT.rglob("*.c")]
    for path in sorted(sources):
        if outside_the_proxy(path.relative_to(_PACKAGE_ROOT)):
            continue
        digest.update(str(path.relative_to(_SRC_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    base = os.environ.get("UBIMESH_NATIVE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "ubimesh" / "native"
    return root / source_hash()


def build(quiet: bool = True) -> Path:
    """Compile HOT_MODULES with mypyc into ``cache_dir()`` (nothing to do when it exists).
    Raises RuntimeError with mypyc's output when the build fails."""
    dest = cache_dir()
    if (dest / "BUILD_OK").exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="ubimesh-native-") as tmp:
        work = Path(tmp)
        shutil.copytree(
            _PACKAGE_ROOT, work / "ubimesh", ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
        env = dict(os.environ, MYPYPATH=str(work))
        proc = subprocess.run(
            [sys.executable, "-m", "mypyc", *HOT_MODULES],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError("mypyc failed:\n" + proc.stdout[-4000:] + proc.stderr[-4000:])
        compile_extensions(work)
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        for so in work.rglob("*.so"):
            rel = so.relative_to(work)
            if rel.parts[0] == "build":
                continue
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(so, target)
        (staging / "BUILD_OK").write_text("\n".join(HOT_MODULES) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    if not quiet:
        print(f"compiled {len(HOT_MODULES)} hot-path modules into {dest}")
    return dest


def compile_extensions(
    root: Path, timeout: float = 300, extensions: tuple[tuple[str, str], ...] = C_EXTENSIONS
) -> None:
    """Compile ``extensions`` (by default all of ``C_EXTENSIONS``) in place under ``root``, a
    directory holding a copy of their sources (``root/ubimesh/...``); raises RuntimeError with
    the compiler's output on failure. ``-ffp-contract=off``: no fused multiply-add, so float
    arithmetic rounds as Python's."""
    script = (
        "from setuptools import Extension, setup\n"
        f"extensions = {list(extensions)!r}\n"
        "setup(name='ubimesh-native-c', script_args=['build_ext', '--inplace'],\n"
        "      ext_modules=[Extension(name, [source], extra_compile_args=['-ffp-contract=off'])\n"
        "                   for name, source in extensions])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            "compiling the C extensions failed:\n" + proc.stdout[-4000:] + proc.stderr[-4000:]
        )


def enable() -> bool:
    """Use the compiled modules when a build for exactly this source exists. Must run before
    any of HOT_MODULES is imported; returns whether the compiled modules are in use."""
    if os.environ.get("UBIMESH_NATIVE", "1") == "0":
        log.info("compiled hot path disabled by UBIMESH_NATIVE=0")
        return False
    dest = cache_dir()
    if not (dest / "BUILD_OK").exists():
        log.info(
            "no compiled hot path for this source (run `ubimesh build-native`); "
            "using the pure-Python modules"
        )
        return False
    loaded = [m for m in HOT_MODULES if _module_name(m) in sys.modules]
    if loaded:
        log.warning("compiled hot path not enabled: %s already imported", ", ".join(loaded))
        return False
    sys.path.insert(0, str(dest))  # the shared mypyc runtime module lives at the top
    for rel in {str(Path(m).parent) for m in HOT_MODULES}:
        package = importlib.import_module(rel.replace("/", "."))
        package.__path__.insert(0, str(dest / rel))
    log.info("compiled hot path in use (%s)", dest)
    return True


def _module_name(rel: str) -> str:
    return rel[: -len(".py")].replace("/", ".")


def main() -> int:
    """``ubimesh build-native``: compile the hot path; exit 1 with mypyc's message on failure."""
    try:
        build(quiet=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"ubimesh build-native: {exc}", file=sys.stderr)
        return 1
    return 0
