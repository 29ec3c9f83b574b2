"""Config text to a plain dict, and a plain dict to a protobuf message, with every error found.

``json_format.ParseDict`` stops at the first problem and describes it without a full path. So
before calling it, ``parse_message`` walks the dict along the message descriptors and reports,
each with its path: unknown fields (with a "did you mean"), fields set twice, two members of one
oneof, values of the wrong shape or type, and ``typed_config`` types that ubimesh does not know.
It drops what it reported, so that ``ParseDict`` (strict: ``ignore_unknown_fields=False``)
then parses the rest and the translator can look for further errors in it.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

import yaml
from google.protobuf import any_pb2, json_format, message_factory, symbol_database

from ubimesh.proxy.xds import extensions
from ubimesh.proxy.xds.context import entry, item, join
from ubimesh.proxy.xds.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Text to dict


# libyaml's parser when PyYAML was built with it (ten times faster), else the pure-Python one.
_SafeBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeBase):  # type: ignore[valid-type,misc]
    """A safe YAML loader closer to what Envoy's YAML reader gives: timestamps and base-60
    numbers ("1:30") stay strings, and a key repeated in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag
        not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_text(text: str) -> dict[str, Any]:
    """A config's text (JSON or YAML, told apart by content) as a dict. Raises ConfigError
    (with an empty path) for malformed text."""
    json_problem = None
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            json_problem = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        except ValueError as exc:
            raise ConfigError("", f"invalid JSON: {exc}") from None
        else:
            return _top_level(value)
    try:
        value = yaml.load(text, Loader=_Loader)  # _Loader is a safe loader
    except yaml.YAMLError as exc:
        if json_problem:
            raise ConfigError("", json_problem) from None
        raise ConfigError("", f"invalid YAML: {_yaml_message(exc)}") from None
    return _top_level(value)


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


def _top_level(value: Any) -> dict[str, Any]:
    if value is None:
        raise ConfigError("", "the config is empty")
    if not isinstance(value, dict):
        raise ConfigError("", f"the config must be a mapping (a JSON object), not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Dict to message

_FD_MESSAGE = 11  # FieldDescriptor.TYPE_MESSAGE
_ANY = "google.protobuf.Any"


def _is_leaf(descriptor: Any) -> bool:
    """Well-known types have their own JSON forms ("5s" for a Duration, a bare number for a
    wrapper): ParseDict checks them as a whole."""
    return bool(descriptor.full_name.startswith("google.protobuf.")) and (
        descriptor.full_name != _ANY
    )


def _undefined_enum_number(fd: Any, raw: Any) -> int | None:
    """A number given for an enum field that the enum does not define (protobuf's JSON parser
    accepts any number for an open enum; the snapshot's enums have only Envoy's values)."""
    if fd.enum_type is None:
        return None
    for value in raw if isinstance(raw, list) else [raw]:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (value not in fd.enum_type.values_by_number)
        ):
            return value
    return None


class _Scanner:
    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.quiet: set[str] = set()
        self.pool = symbol_database.Default().pool

    def fail(self, path: str, message: str, *, quiet: str | None = None) -> None:
        self.errors.append(ConfigError(path, message))
        self.quiet.add(path if quiet is None else quiet)

    def message(self, value: Any, descriptor: Any, path: str) -> dict[str, Any] | None:
        """The cleaned copy of ``value`` (a dict for a ``descriptor`` message), or None."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping ({descriptor.name}), got {_kind(value)}")
            return None
        if descriptor.full_name == _ANY:
            return self.any(value, path)
        by_json = {f.json_name: f for f in descriptor.fields}
        cleaned: dict[str, Any] = {}
        used: dict[str, str] = {}
        oneofs: dict[str, str] = {}
        leaves: dict[str, Any] = {}
        for key, raw in value.items():
            if not isinstance(key, str):
                self.fail(path, f"field names must be strings, got {key!r}")
                continue
            fd = descriptor.fields_by_name.get(key) or by_json.get(key)
            if fd is None:
                self.fail(join(path, key), self._unknown(descriptor, key))
                continue
            fpath = join(path, fd.name)
            if fd.name in used:
                self.fail(fpath, f"set twice (as {used[fd.name]!r} and {key!r})")
                continue
            used[fd.name] = key
            if raw is None:
                continue  # JSON null: the field keeps its default
            oneof = fd.containing_oneof
            if oneof is not None:
                if oneof.name in oneofs:
                    self.fail(
                        fpath,
                        f"only one of {', '.join(f.name for f in oneof.fields)} may "
                        f"be set, and {oneofs[oneof.name]} is set too",
                        quiet=path,
                    )
                    continue
                oneofs[oneof.name] = fd.name
            if fd.type != _FD_MESSAGE or _is_leaf(fd.message_type):
                leaves[key] = (fd, raw)
                continue
            converted: Any
            if fd.message_type.GetOptions().map_entry:
                converted = self._map(raw, fd, fpath)
            elif fd.is_repeated:
                converted = self._list(raw, fd.message_type, fpath)
            else:
                converted = self.message(raw, fd.message_type, fpath)
            if converted is not None:
                cleaned[key] = converted
        cleaned.update(self._leaves(leaves, descriptor, path))
        return cleaned

    def _unknown(self, descriptor: Any, key: str) -> str:
        names = [f.name for f in descriptor.fields]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field: {descriptor.full_name} has no field {key!r}{hint}"

    def _list(self, raw: Any, descriptor: Any, path: str) -> list[Any] | None:
        if not isinstance(raw, list):
            self.fail(path, f"expected a list, got {_kind(raw)}")
            return None
        out = []
        for i, element in enumerate(raw):
            converted = self.message(element, descriptor, item(path, i))
            # A bad element becomes an empty one, so the indices of the others stay the same.
            out.append({} if converted is None else converted)
        return out

    def _map(self, raw: Any, fd: Any, path: str) -> dict[str, Any] | None:
        value_fd = fd.message_type.fields_by_name["value"]
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, got {_kind(raw)}")
            return None
        if value_fd.type != _FD_MESSAGE or _is_leaf(value_fd.message_type):
            return dict(raw) if self._leaf_ok(fd, raw, path) else None
        out = {}
        for key, element in raw.items():
            converted = self.message(element, value_fd.message_type, entry(path, str(key)))
            if converted is not None:
                out[key] = converted
        return out

    def _leaf_ok(self, fd: Any, raw: Any, path: str) -> bool:
        cls = message_factory.GetMessageClass(fd.containing_type)
        try:
            json_format.ParseDict({fd.name: raw}, cls(), ignore_unknown_fields=False)
        except json_format.ParseError as exc:
            self.fail(path, _parse_error_message(exc, fd.name), quiet=path.rsplit(".", 1)[0])
            return False
        return True

    def _leaves(self, leaves: dict[str, Any], descriptor: Any, path: str) -> dict[str, Any]:
        for key, (fd, raw) in list(leaves.items()):
            bad = _undefined_enum_number(fd, raw)
            if bad is not None:
                self.fail(
                    join(path, fd.name), f"{bad} is not a value of {fd.enum_type.name}", quiet=path
                )
                del leaves[key]
        if not leaves:
            return {}
        cls = message_factory.GetMessageClass(descriptor)
        try:
            json_format.ParseDict(
                {key: raw for key, (_fd, raw) in leaves.items()}, cls(), ignore_unknown_fields=False
            )
        except json_format.ParseError:
            pass
        else:
            return {key: raw for key, (_fd, raw) in leaves.items()}
        good = {}
        for key, (fd, raw) in leaves.items():
            try:
                json_format.ParseDict({key: raw}, cls(), ignore_unknown_fields=False)
            except json_format.ParseError as exc:
                self.fail(join(path, fd.name), _parse_error_message(exc, fd.name), quiet=path)
            else:
                good[key] = raw
        return good

    def any(self, value: dict[str, Any], path: str) -> dict[str, Any] | None:
        type_url = value.get("@type")
        if not isinstance(type_url, str) or not type_url:
            self.fail(path, "@type is required (the type URL of the packed message)")
            return None
        name = extensions.type_name(type_url)
        try:
            descriptor = self.pool.FindMessageTypeByName(name)
        except KeyError:
            self.errors.append(ConfigError.not_supported(path, f"typed config type {name}"))
            self.quiet.add(path)
            return None
        if _is_leaf(descriptor):
            try:
                json_format.ParseDict(value, any_pb2.Any(), ignore_unknown_fields=False)
            except json_format.ParseError as exc:
                self.fail(path, _parse_error_message(exc, ""))
                return None
            return dict(value)
        inner = self.message({k: v for k, v in value.items() if k != "@type"}, descriptor, path)
        if inner is None:  # pragma: no cover - the inner value is a dict by construction
            return None
        return {"@type": type_url, **inner}


_PARSE_PREFIX = re.compile(r"^(?:Failed to parse \w+ field: )+")


def _parse_error_message(exc: json_format.ParseError, field_name: str) -> str:
    """ParseDict's message without its "Failed to parse x field:" chain and trailing dots."""
    text = _PARSE_PREFIX.sub("", str(exc))
    text = re.sub(r" at \"?[\w.\[\]]+\"?\.?$", "", text).rstrip(".")
    return f"invalid value: {text}" if field_name else text


def parse_message(source: dict[str, Any], cls: Any) -> tuple[Any, list[ConfigError], set[str]]:
    """Parse ``source`` into a new ``cls`` message. Returns the message, the errors found (in
    document order) and the paths those errors were about; the message holds whatever could be
    parsed around them."""
    scanner = _Scanner()
    cleaned = scanner.message(source, cls.DESCRIPTOR, "")
    msg = cls()
    try:
        json_format.ParseDict(cleaned or {}, msg, ignore_unknown_fields=False)
    except json_format.ParseError as exc:  # pragma: no cover - the scan reports these first
        scanner.fail("", f"cannot parse the config: {exc}")
        msg = cls()
    return msg, scanner.errors, scanner.quiet
