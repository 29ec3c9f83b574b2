"""``ubimesh.policy.files.read_files``: a large input read by this process and a forked child
gives exactly what ``parse_documents`` gives file by file (resources, order, sources), and an
input with any problem gets exactly the serial errors (lines and columns included).

The cutting is checked in this process; the fork only happens in a single-threaded process
(and the test process has threads by now), so the parallel reads run in a fresh
interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ubimesh.control.resources import parse_documents
from ubimesh.control.resources.loader import parse_part
from ubimesh.policy.files import split_input

ROOT = Path(__file__).resolve().parents[2]


def _service(name: str, namespace: str = "ns0", port: int = 8080) -> str:
    return (
        "apiVersion: ubimesh.io/v1alpha1\nkind: Service\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  ports:\n  - {{name: http, port: {port}, protocol: http}}\n"
    )


#: Texts whose documents a cut must number exactly as the whole file does: an implicit first
#: document, comments before the first ``---``, empty documents, ``---`` with content on its
#: line, block scalars before a ``---``, a ``...`` end marker, CRLF line ends.
TEXTS = {
    "implicit first": _service("a") + "---\n" + _service("b") + "---\n" + _service("c"),
    "comments first": "# mesh\n\n# more\n---\n" + _service("a") + "---\n" + _service("b"),
    "empty documents": "---\n---\n" + _service("a") + "---\n---\n" + _service("b") + "---\n",
    "content on the marker line": "--- # a\n"
    + _service("a")
    + "--- {apiVersion: ubimesh.io/v1alpha1, kind: Service, metadata: {name: b, namespace: "
    "ns0}, spec: {ports: [{name: http, port: 80, protocol: http}]}}\n" + "---\n" + _service("c"),
    "block scalar": _service("a").replace(
        "metadata: {name: a, namespace: ns0}",
        "metadata:\n  name: a\n  namespace: ns0\n  annotations:\n    note: |\n      x\n      y",
    )
    + "---\n"
    + _service("b"),
    "end marker": _service("a") + "...\n---\n" + _service("b"),
    "crlf": (_service("a") + "---\n" + _service("b") + "---\n" + _service("c")).replace(
        "\n", "\r\n"
    ),
}


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("pieces", [2, 3, 50])
def test_every_cut_numbers_documents_as_the_whole_file(name: str, pieces: int) -> None:
    text = TEXTS[name]
    whole = parse_documents(text, "m.yaml")
    cut = split_input([("m.yaml", text)], pieces)
    assert "".join(p.text for p in cut) == text
    assert len(cut) > 1
    found = []
    for piece in cut:
        resources, errors, count = parse_part(piece.text, piece.name, piece.start)
        assert not errors
        assert count == piece.documents, piece
        found.extend(resources)
    assert found == whole
    assert [r.source for r in found] == [r.source for r in whole]


def test_cuts_fall_on_document_starts_only() -> None:
    one = _service("only")
    two_files = [("a.yaml", one), ("b.yaml", TEXTS["implicit first"])]
    cut = split_input(two_files, 10)
    # A single-document file stays whole; the other is cut at its `---` lines.
    assert [(p.name, p.start, p.documents) for p in cut] == [
        ("a.yaml", 1, 1),
        ("b.yaml", 1, 1),
        ("b.yaml", 2, 1),
        ("b.yaml", 3, 1),
    ]
    assert all(p.text.startswith("---") for p in cut[2:])


SCRIPT = """
import os, sys
sys.path.insert(0, {bench!r})
import yaml
import policy_blast_radius as generator
from ubimesh.control.resources import ResourceErrors
from ubimesh.policy import files

files.PARALLEL_MIN_CHARS = 0
assert files.split.can_fork(), "expected a single-threaded process on 2+ CPUs"
docs = generator.generate_documents(60, 150, seed=3)
text = yaml.dump_all(docs, Dumper=yaml.CSafeDumper, sort_keys=False)
first = yaml.dump_all(docs[:20], Dumper=yaml.CSafeDumper, sort_keys=False)
rest = "# the rest\\n" + yaml.dump_all(docs[20:], Dumper=yaml.CSafeDumper, sort_keys=False)

forks = []
real_fork = os.fork
def counting_fork():
    pid = real_fork()
    if pid:
        forks.append(pid)
    return pid
os.fork = counting_fork

def outcome(read, inputs):
    try:
        found = read(inputs)
    except ResourceErrors as exc:
        return "errors", [str(e) for e in exc.errors]
    return "ok", found, [r.source for r in found]

def same(inputs, label, forked=True):
    before = len(forks)
    parallel = outcome(files.read_files, inputs)
    assert len(forks) == before + int(forked), (label, forks)
    serial = outcome(files.read_serially, inputs)
    assert parallel == serial, (label, parallel[:2], serial[:2])
    return parallel

ok = same([("mesh.yaml", text)], "one file")
assert ok[0] == "ok" and len(ok[1]) == len(docs), ok[0]
assert ok[2][-1] == f"mesh.yaml#{{len(docs)}}", ok[2][-1]
same([("a.yaml", first), ("b.yaml", rest)], "two files")

# Problems anywhere: the serial errors, with their lines and columns.
lines = text.splitlines(keepends=True)
late = len(lines) * 3 // 4
broken = "".join(lines[:late] + ["  bad: [unclosed\\n"] + lines[late:])
err = same([("mesh.yaml", broken)], "a YAML error late in the input")
assert err[0] == "errors" and any("line " in e for e in err[1]), err
invalid = text.replace("port: 8080", "port: 99999", 1)
err = same([("mesh.yaml", invalid)], "a validation error")
assert err[0] == "errors" and "99999" in err[1][0], err
twice = text + "---\\n" + yaml.dump(docs[1], Dumper=yaml.CSafeDumper)
err = same([("mesh.yaml", twice)], "a resource defined twice")
assert err[0] == "errors" and "defined twice" in err[1][0], err

# A child that dies without sending anything: this process reads its pieces itself.
parent = os.getpid()
real_parse = files._parse_piece
def dying_parse(piece):
    if os.getpid() != parent:
        os._exit(3)
    return real_parse(piece)
files._parse_piece = dying_parse
same([("mesh.yaml", text)], "a dead child")
files._parse_piece = real_parse

# A small input is read in this process; `meanwhile` runs either way.
files.PARALLEL_MIN_CHARS = 10**9
called = []
found = files.read_files([("mesh.yaml", text)], meanwhile=lambda: called.append(1))
assert called == [1] and len(found) == len(docs)
same([("mesh.yaml", text)], "small", forked=False)
print("OK")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_parallel_read_gives_the_serial_answer_and_errors() -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: read_files does not split")
    code = SCRIPT.format(bench=str(ROOT / "bench"))
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stdout + run.stderr
