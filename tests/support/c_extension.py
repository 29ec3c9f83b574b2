"""A hand-written C extension of the hot path (``native.C_EXTENSIONS``), compiled for a test
exactly as ``ubimesh build-native`` compiles it, and loaded without touching ``sys.modules``:
the module that imports it in the proxy keeps its own lookup (the build's, or none)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from ubimesh import native

PACKAGE_ROOT = Path(native.__file__).resolve().parent.parent


def compile_and_load(name: str, root: Path) -> ModuleType:
    """Compile the C extension ``name`` (a module of ``native.C_EXTENSIONS``) under the empty
    directory ``root`` and load it."""
    (source,) = [src for module, src in native.C_EXTENSIONS if module == name]
    target = root / source
    target.parent.mkdir(parents=True)
    shutil.copy(PACKAGE_ROOT / source, target)
    native.compile_extensions(root, extensions=((name, source),))
    (built,) = target.parent.glob(name.rsplit(".", 1)[1] + "*.so")
    spec = importlib.util.spec_from_file_location(name, built)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
