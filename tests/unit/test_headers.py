"""The request-path header multimap (ubimesh.proto.headers.Headers).

Unit tests of each method, then a Hypothesis state machine that runs random sequences of
add/set/remove/copy against a deliberately naive reference multimap and compares every query.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ubimesh.proto.headers import HOP_BY_HOP, Headers

# -- unit tests ----------------------------------------------------------------------------------


def test_empty() -> None:
    h = Headers()
    assert len(h) == 0
    assert list(h) == []
    assert h.get("a") is None
    assert h.get_first("a") is None
    assert h.get_all("a") == []
    assert "a" not in h
    assert h.remove("a") is False
    assert Headers(None).items == []


def test_get_joins_repeated_values_with_a_comma() -> None:
    h = Headers([("accept", "a/b"), ("x", "1"), ("accept", "c/d"), ("accept", "")])
    assert h.get("accept") == "a/b,c/d,"
    assert h.get_first("accept") == "a/b"
    assert h.get_all("accept") == ["a/b", "c/d", ""]
    assert h.get("x") == "1"


def test_empty_value_is_present_not_missing() -> None:
    h = Headers([("x", "")])
    assert "x" in h
    assert h.get("x") == ""
    assert h.get_first("x") == ""


def test_set_keeps_first_position_and_drops_the_rest() -> None:
    h = Headers([("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("a", "5")])
    h.set("a", "new")
    assert list(h) == [("a", "new"), ("b", "2"), ("c", "4")]
    h.set("d", "appended")
    assert list(h) == [("a", "new"), ("b", "2"), ("c", "4"), ("d", "appended")]
    h.set("b", "B")
    assert list(h) == [("a", "new"), ("b", "B"), ("c", "4"), ("d", "appended")]


def test_remove_every_entry() -> None:
    h = Headers([("a", "1"), ("b", "2"), ("a", "3")])
    assert h.remove("a") is True
    assert list(h) == [("b", "2")]
    assert h.remove("a") is False
    assert list(h) == [("b", "2")]


def test_add_appends_duplicates() -> None:
    h = Headers()
    h.add("a", "1")
    h.add("b", "2")
    h.add("a", "1")
    assert list(h) == [("a", "1"), ("b", "2"), ("a", "1")]
    assert len(h) == 3


def test_latin1_values_survive() -> None:
    value = "".join(chr(c) for c in range(0x20, 0x100) if c != 0x7F)
    h = Headers()
    h.add("x-raw", value)
    assert h.get("x-raw") == value
    assert h.get("x-raw").encode("latin-1") == bytes(c for c in range(0x20, 0x100) if c != 0x7F)


def test_copy_is_independent() -> None:
    h = Headers([("a", "1"), ("b", "2"), ("a", "3")])
    c = h.copy()
    c.set("a", "x")
    c.add("z", "9")
    c.remove("b")
    assert list(h) == [("a", "1"), ("b", "2"), ("a", "3")]
    h.set("b", "y")
    h.remove("a")
    assert list(c) == [("a", "x"), ("z", "9")]


def test_constructor_does_not_alias_its_argument() -> None:
    source = [("a", "1")]
    h = Headers(source)
    h.add("b", "2")
    h.set("a", "x")
    source.append(("c", "3"))
    assert source == [("a", "1"), ("c", "3")]
    assert list(h) == [("a", "x"), ("b", "2")]


def test_contains_only_matches_names() -> None:
    h = Headers([("a", "b")])
    assert "a" in h
    assert "b" not in h
    assert ("a", "b") not in h


def test_hop_by_hop_set() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } <= HOP_BY_HOP
    assert all(name == name.lower() for name in HOP_BY_HOP)
    assert "host" not in HOP_BY_HOP and "content-length" not in HOP_BY_HOP


# -- model-based test ----------------------------------------------------------------------------


class ReferenceMultimap:
    """The obvious implementation: a list of pairs, rebuilt on every change."""

    def __init__(self, pairs: list[tuple[str, str]] | None = None) -> None:
        self.pairs = list(pairs or [])

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]

    def get(self, name: str) -> str | None:
        vals = self.values(name)
        return ",".join(vals) if vals else None

    def add(self, name: str, value: str) -> None:
        self.pairs = [*self.pairs, (name, value)]

    def set(self, name: str, value: str) -> None:
        names = [k for k, _ in self.pairs]
        if name not in names:
            self.add(name, value)
            return
        first = names.index(name)
        out = []
        for i, (k, v) in enumerate(self.pairs):
            if i == first:
                out.append((name, value))
            elif k != name:
                out.append((k, v))
        self.pairs = out

    def remove(self, name: str) -> bool:
        before = len(self.pairs)
        self.pairs = [(k, v) for k, v in self.pairs if k != name]
        return len(self.pairs) != before


NAMES = st.sampled_from(["a", "b", "host", "x-forwarded-for", "content-length", "cookie"])
VALUES = st.text(alphabet=st.characters(max_codepoint=0xFF, blacklist_categories=("Cs",)))


class HeadersMachine(RuleBasedStateMachine):
    """Several Headers objects (copies of one another) each shadowed by a reference."""

    def __init__(self) -> None:
        super().__init__()
        self.subjects: list[tuple[Headers, ReferenceMultimap]] = [(Headers(), ReferenceMultimap())]

    @rule(initial=st.lists(st.tuples(NAMES, VALUES), max_size=6))
    def new_from_pairs(self, initial: list[tuple[str, str]]) -> None:
        self.subjects.append((Headers(initial), ReferenceMultimap(initial)))

    @rule(i=st.integers(min_value=0), name=NAMES, value=VALUES)
    def add(self, i: int, name: str, value: str) -> None:
        h, ref = self.subjects[i % len(self.subjects)]
        h.add(name, value)
        ref.add(name, value)

    @rule(i=st.integers(min_value=0), name=NAMES, value=VALUES)
    def set(self, i: int, name: str, value: str) -> None:
        h, ref = self.subjects[i % len(self.subjects)]
        h.set(name, value)
        ref.set(name, value)

    @rule(i=st.integers(min_value=0), name=NAMES)
    def remove(self, i: int, name: str) -> None:
        h, ref = self.subjects[i % len(self.subjects)]
        assert h.remove(name) == ref.remove(name)

    @precondition(lambda self: len(self.subjects) < 5)
    @rule(i=st.integers(min_value=0))
    def copy(self, i: int) -> None:
        h, ref = self.subjects[i % len(self.subjects)]
        self.subjects.append((h.copy(), ReferenceMultimap(ref.pairs)))

    @invariant()
    def agrees_with_reference(self) -> None:
        for h, ref in self.subjects:
            assert list(h) == ref.pairs
            assert len(h) == len(ref.pairs)
            for name in ["a", "b", "host", "x-forwarded-for", "content-length", "cookie", "zz"]:
                vals = ref.values(name)
                assert h.get(name) == ref.get(name), name
                assert h.get_all(name) == vals
                assert h.get_first(name) == (vals[0] if vals else None)
                assert (name in h) == bool(vals)


HeadersMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30)
TestHeadersModel = HeadersMachine.TestCase
