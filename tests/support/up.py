"""Run ``ubimesh up`` on a mesh file for a test: a real process, ready when it says so."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Up:
    """A running ``ubimesh up``: its process, data dir and output file."""

    proc: subprocess.Popen[bytes]
    data: Path
    out: Path

    def output(self) -> str:
        return self.out.read_text()


@contextlib.contextmanager
def running_up(
    mesh_text: str, workdir: Path, api_port: int, xds_port: int, *, ready_timeout: float = 40.0
) -> Iterator[Up]:
    """``ubimesh up`` on ``mesh_text`` (written to ``workdir/mesh.yaml``, data in
    ``workdir/data``), yielded once it says the mesh is ready (bounded by ``ready_timeout``
    plus 5 s); on exit SIGINT, and the run must end with code 0 and "stopped"."""
    mesh = workdir / "mesh.yaml"
    mesh.write_text(mesh_text)
    out_path = workdir / "up.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ubimesh.cli.main", "up", "-f", str(mesh), "--data-dir",
             str(workdir / "data"), "--api-address", f"127.0.0.1:{api_port}",
             "--xds-address", f"127.0.0.1:{xds_port}", "--ready-timeout", str(ready_timeout)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        up = Up(proc, workdir / "data", out_path)
        try:
            deadline = time.monotonic() + ready_timeout + 5
            while b"the mesh is ready" not in out_path.read_bytes():
                assert proc.poll() is None, up.output()
                assert time.monotonic() < deadline, up.output()
                time.sleep(0.1)
            yield up
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert code == 0, up.output()
    assert "ubimesh up: stopped" in up.output()
