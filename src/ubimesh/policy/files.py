"""The resource files of ``ubimesh policy ... -f`` (docs/policy.md section 4), read by two
processes when they are large.

``read_files`` returns what ``parse_documents`` on each file in turn returns, and raises what
it raises: the same resources in the same order, sources numbered the same (``FILE#N``).
Parsing YAML and validating each document is CPU-bound Python, most of a second for a
1,000-service mesh (5,555 documents, 1.8 MB), and documents are independent of each other, so
with more than one CPU the input is cut into pieces and a forked child reads pieces while
this process does too (after the caller's ``meanwhile``: the imports it needs next); the
child sends its resources back pickled.

The input is cut at document starts: ``---`` lines, which YAML never reads as anything else
(libyaml ends any scalar or collection before a ``---`` at column 0, or reports an error).
Each piece is numbered from the count of documents predicted for the pieces before it (the
``---`` lines, plus an implicit first document when something other than comments precedes
the first one). Whenever anything is off (a prediction differs from the count the parser
finds, a piece has a problem, a resource is defined twice), the whole input is read again in
this process, serially, so that every error message (with its line and column) is exactly
the serial one: the parallel path only ever returns a fully valid result. A child that fails
or hangs is killed, and this process reads its pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from ubimesh.control.resources.errors import ResourceError, ResourceErrors
from ubimesh.control.resources.loader import duplicate_errors, parse_documents, parse_part
from ubimesh.control.resources.model import Resource
from ubimesh.policy import split

#: From how many characters (all files together) the input is split: below, forking and
#: pickling cost more than they save (a 1,000-service mesh is 1.8 MB).
PARALLEL_MIN_CHARS = 256 * 1024
#: What may follow ``---`` at the start of a line for it to start a document.
_BLANKS = frozenset(" \t\r\n")

#: Into how many pieces the input is cut: enough for the two processes to end together
#: (each takes the next piece when done with one), few enough to cost nothing.
PIECES = 24


class Piece(NamedTuple):
    """A piece of a file, cut where a document starts."""

    name: str  # the file's
    text: str
    start: int  # the number of its first document in the file (1-based)
    documents: int  # how many documents it holds (predicted)


def read_files(
    files: Sequence[tuple[str, str]], meanwhile: Callable[[], object] | None = None
) -> list[Resource]:
    """Every resource of ``files`` ((name, text) pairs), validated one by one (references
    between them are ``validate_set``'s job), as ``parse_documents`` reads each file. Raises
    ``ResourceErrors`` listing every problem of every file (duplicates within a file
    included). ``meanwhile`` (imports the caller needs next, say) is called once, while a
    child, if there is one, is already reading."""
    if sum(len(text) for _, text in files) >= PARALLEL_MIN_CHARS and split.can_fork():
        found = _read_in_two(files, meanwhile)
        if found is not None:
            return found
    elif meanwhile is not None:
        meanwhile()
    return read_serially(files)


def read_serially(files: Sequence[tuple[str, str]]) -> list[Resource]:
    """``read_files`` in this process alone."""
    resources: list[Resource] = []
    errors: list[ResourceError] = []
    for name, text in files:
        try:
            resources.extend(parse_documents(text, name))
        except ResourceErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ResourceErrors(errors)
    return resources


def split_input(files: Sequence[tuple[str, str]], pieces: int = PIECES) -> list[Piece]:
    """``files`` cut at document starts into about ``pieces`` pieces of similar size (a file
    with a single document stays whole), each with the number of its first document in its
    file and the number of documents predicted for it."""
    size = max(1, sum(len(text) for _, text in files) // pieces)
    out: list[Piece] = []
    for name, text in files:
        start = 1  # the file's number of the piece's first document
        begin = 0  # where the piece starts
        markers = 0  # document starts in text[begin:here]
        implicit = None  # the implicit first document (0 or 1), once known
        for at in _document_starts(text):
            if implicit is None:
                implicit = _implicit_first(text[:at])
            if at - begin >= size:
                count = markers + (implicit if begin == 0 else 0)
                out.append(Piece(name, text[begin:at], start, count))
                start += count
                begin, markers = at, 0
            markers += 1
        if begin < len(text):
            if implicit is None:
                implicit = _implicit_first(text)
            count = markers + (implicit if begin == 0 else 0)
            out.append(Piece(name, text[begin:], start, count))
    return out


def _document_starts(text: str) -> Iterator[int]:
    """The offset of each ``---`` line of ``text`` (``---`` at the start of a line, then a
    blank or the line's end), in order."""
    if text.startswith("---") and (len(text) == 3 or text[3] in _BLANKS):
        yield 0
    found = text.find("\n---")
    while found != -1:
        after = found + 4
        if after == len(text) or text[after] in _BLANKS:
            yield found + 1
        found = text.find("\n---", after)


def _implicit_first(before: str) -> int:
    """1 when ``before`` (a file's text before its first ``---`` line) holds an implicit
    first document: anything but blank lines and comments. A prediction: the caller checks
    the count against the parser."""
    return int(
        any(
            line.strip() and not line.strip().startswith("#")
            for line in before.lstrip("\ufeff").splitlines()
        )
    )


def _parse_piece(piece: Piece) -> tuple[list[Resource], bool]:
    """The resources of ``piece``, and whether they are exactly what a serial read gives
    (no problem, and as many documents as predicted: the numbering is right)."""
    resources, errors, count = parse_part(piece.text, piece.name, piece.start)
    return resources, not errors and count == piece.documents


def _read_in_two(
    files: Sequence[tuple[str, str]], meanwhile: Callable[[], object] | None
) -> list[Resource] | None:
    """The resources of ``files`` read by this process and a forked child
    (``split.share``: this process runs ``meanwhile`` first), or None when a check fails
    (the caller then reads them serially)."""
    pieces = split_input(files)
    if not 2 <= len(pieces) <= split.MAX_ITEMS:
        if meanwhile is not None:
            meanwhile()
        return None
    done = split.share(len(pieces), lambda i: _parse_piece(pieces[i]), meanwhile)
    resources: list[Resource] = []
    for i in range(len(pieces)):
        found, exact = done[i]
        if not exact:
            return None
        resources.extend(found)
    if duplicate_errors(resources):
        return None
    return resources
