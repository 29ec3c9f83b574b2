"""``ubimesh`` dispatches a command with only its own module imported: the command table
matches the modules' ``COMMANDS``, and ``ubimesh policy`` loads no asyncio, proxy runtime or
control-plane server (their imports would be most of a short command's start)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from ubimesh.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_command_table_matches_the_modules() -> None:
    assert set(main.COMMAND_MODULES.values()) == set(main._MODULE_ORDER)
    for name in main._MODULE_ORDER:
        module = importlib.import_module(f"ubimesh.cli.{name}")
        mine = {c for c, m in main.COMMAND_MODULES.items() if m == name}
        assert mine == set(module.COMMANDS), name
    # The whole parser still knows every command, proxy and build-native included.
    sub = next(a for a in main.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {*main.COMMAND_MODULES, "proxy", "build-native"}


SCRIPT = """
import contextlib, io, sys, yaml
sys.path.insert(0, {bench!r})
import policy_blast_radius as generator
from ubimesh.cli.main import main

path = {path!r}
with open(path, "w") as out:
    yaml.safe_dump_all(generator.generate_documents(12, 30, seed=2), out)
with contextlib.redirect_stdout(io.StringIO()) as printed:
    code = main(["policy", "blast-radius", "-f", path, "svc0.ns0"])
assert code == 0 and "reaches" in printed.getvalue(), (code, printed.getvalue())
heavy = sorted(m for m in sys.modules if m in {{"asyncio", "ssl", "cryptography"}}
               or m.startswith(("ubimesh.proxy.server", "ubimesh.proxy.app",
                                "ubimesh.control.server", "ubimesh.cli.agent_cmds")))
print(heavy)
"""


def test_policy_command_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    code = SCRIPT.format(bench=str(ROOT / "bench"), path=str(tmp_path / "mesh.yaml"))
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
