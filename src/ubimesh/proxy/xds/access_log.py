"""envoy.config.accesslog.v3.AccessLog for the HTTP connection manager, the TCP proxy and
listeners: the file and stream (stdout, stderr) loggers, their formats and the filters.

The format is compiled here once (``ubimesh.proxy.access_log.format``) only to refuse what the
proxy cannot print, naming the command; the snapshot keeps the format as text and the proxy
compiles it again for its own use (compiled formats are closures and do not pickle).
"""

from __future__ import annotations

import os
from typing import Any

from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import json_format as pb_json

from ubimesh.proxy.access_log.filters import RESPONSE_FLAGS, SUPPORTED_KINDS
from ubimesh.proxy.access_log.format import FormatError, compile_format
from ubimesh.proxy.snapshot.types import AccessLogConfig, AccessLogFilter
from ubimesh.proxy.xds import extensions
from ubimesh.proxy.xds.context import Ctx, item, join
from ubimesh.proxy.xds.route import data_source

StdoutAccessLog = stream_pb2.StdoutAccessLog
StderrAccessLog = stream_pb2.StderrAccessLog
STDOUT_TYPE = StdoutAccessLog.DESCRIPTOR.full_name
STDERR_TYPE = StderrAccessLog.DESCRIPTOR.full_name

#: The access loggers of HCM, TCP proxy and listener access logs.
LOGGERS: dict[str, Any] = {
    extensions.FILE_ACCESS_LOG_TYPE: extensions.FileAccessLog,
    STDOUT_TYPE: StdoutAccessLog,
    STDERR_TYPE: StderrAccessLog,
}

_NOT_YET = "not implemented yet"
_ACCESS_LOG = {"name", "typed_config", "filter"}
_FILE = {"path", "format", "json_format", "log_format"}
_FILE_HINTS = {"typed_json_format": "use log_format.json_format"}
_STREAM = {"log_format"}
_FORMAT = {"text_format", "json_format", "text_format_source", "omit_empty_values"}
_FORMAT_HINTS = {
    "content_type": "the content type is for local reply bodies, not access logs",
    "formatters": "formatter extensions are " + _NOT_YET,
    "json_format_options": "JSON format options are " + _NOT_YET,
}
_FILTER = set(SUPPORTED_KINDS)
_FILTER_HINT = (
    "this access log filter is " + _NOT_YET + "; supported: " + ", ".join(SUPPORTED_KINDS)
)
_COMPARISON_HOLDER = {"comparison"}
_COMPARISON = {"op", "value"}
_RUNTIME_UINT32 = {"default_value", "runtime_key"}
_FLAGS = {"flags"}
_FILTERS = {"filters"}
_OPS = {0: "EQ", 1: "GE", 2: "LE", 3: "NE"}


def access_logs(ctx: Ctx, msgs: Any, path: str) -> tuple[AccessLogConfig, ...]:
    """A repeated ``access_log`` field (of an HCM, a TCP proxy or a listener)."""
    out = []
    for i, msg in enumerate(msgs):
        config = access_log(ctx, msg, item(path, i))
        if config is not None:
            out.append(config)
    return tuple(out)


def access_log(ctx: Ctx, msg: Any, path: str) -> AccessLogConfig | None:
    """envoy.config.accesslog.v3.AccessLog with a file, stdout or stderr logger."""
    ctx.fields(msg, path, _ACCESS_LOG)
    flt = None
    if msg.HasField("filter"):
        flt = access_log_filter(ctx, msg.filter, join(path, "filter"))
    tpath = join(path, "typed_config")
    if not msg.HasField("typed_config"):
        ctx.error(tpath, f"is required (no typed_config for access log {msg.name!r})")
        return None
    config = extensions.unpack(ctx, msg.typed_config, tpath, LOGGERS, "as an access logger")
    if config is None:
        return None
    type_name = config.DESCRIPTOR.full_name
    text: str | None = None
    json_text = ""
    omit = False
    if type_name == extensions.FILE_ACCESS_LOG_TYPE:
        ctx.fields(config, tpath, _FILE, _FILE_HINTS)
        log_path = config.path
        _check_path(ctx, log_path, join(tpath, "path"))
        which = config.WhichOneof("access_log_format")
        if which == "format":
            text = config.format
        elif which == "json_format":
            json_text = _json_text(ctx, config.json_format, join(tpath, "json_format"))
        elif which == "log_format":
            text, json_text, omit = _log_format(ctx, config.log_format, join(tpath, "log_format"))
    else:
        ctx.fields(config, tpath, _STREAM)
        log_path = "/dev/stdout" if type_name == STDOUT_TYPE else "/dev/stderr"
        if config.HasField("log_format"):
            text, json_text, omit = _log_format(ctx, config.log_format, join(tpath, "log_format"))
    return AccessLogConfig(
        name=msg.name,
        path=log_path,
        text_format=text,
        json_format=json_text,
        omit_empty_values=omit,
        filter=flt,
    )


def _check_path(ctx: Ctx, log_path: str, path: str) -> None:
    if log_path in ("/dev/stdout", "/dev/stderr"):
        return
    directory = os.path.dirname(os.path.abspath(log_path)) if log_path else ""
    if log_path and not os.path.isdir(directory):
        ctx.error(path, f"cannot open access log {log_path}: directory {directory} does not exist")


def _json_text(ctx: Ctx, struct: Any, path: str) -> str:
    """A json_format Struct as sorted JSON text, after checking that it compiles."""
    import json

    obj = _integral(pb_json.MessageToDict(struct))
    try:
        compile_format(None, json.dumps(obj), False)
    except FormatError as exc:
        ctx.error(path, str(exc))
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _integral(value: Any) -> Any:
    """A Struct holds every number as a double: 1 comes back as 1.0, and is printed as 1."""
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _log_format(ctx: Ctx, msg: Any, path: str) -> tuple[str | None, str, bool]:
    """envoy.config.core.v3.SubstitutionFormatString: (text format, JSON text, omit empty)."""
    ctx.fields(msg, path, _FORMAT, _FORMAT_HINTS)
    omit = msg.omit_empty_values
    which = msg.WhichOneof("format")
    if which == "json_format":
        return None, _json_text(ctx, msg.json_format, join(path, "json_format")), omit
    text: str | None = None
    if which == "text_format":
        text = msg.text_format
        tpath = join(path, "text_format")
    elif which == "text_format_source":
        tpath = join(path, "text_format_source")
        raw = data_source(ctx, msg.text_format_source, tpath)
        text = raw.decode("utf-8", "replace") if raw is not None else ""
    if text is not None:
        try:
            compile_format(text, "", omit)
        except FormatError as exc:
            ctx.error(tpath, str(exc))
    return text, "", omit


def access_log_filter(ctx: Ctx, msg: Any, path: str) -> AccessLogFilter | None:
    """envoy.config.accesslog.v3.AccessLogFilter (the kinds in ``SUPPORTED_KINDS``)."""
    ctx.fields(msg, path, _FILTER, default_hint=_FILTER_HINT)
    kind = msg.WhichOneof("filter_specifier")
    if kind is None or kind not in _FILTER:
        return None
    sub = getattr(msg, kind)
    spath = join(path, kind)
    if kind in ("status_code_filter", "duration_filter"):
        ctx.fields(sub, spath, _COMPARISON_HOLDER)
        cpath = join(spath, "comparison")
        comparison = sub.comparison
        ctx.fields(comparison, cpath, _COMPARISON)
        op = _OPS.get(comparison.op)
        if op is None:
            ctx.error(join(cpath, "op"), f"{comparison.op} is not a value of ComparisonFilter.Op")
            op = "EQ"
        # runtime_key is accepted and has no effect: ubimesh has no runtime, the default
        # value is the value.
        ctx.fields(comparison.value, join(cpath, "value"), _RUNTIME_UINT32)
        return AccessLogFilter(kind, op=op, value=comparison.value.default_value)
    if kind == "not_health_check_filter":
        ctx.fields(sub, spath, ())
        return AccessLogFilter(kind)
    if kind == "response_flag_filter":
        ctx.fields(sub, spath, _FLAGS)
        fpath = join(spath, "flags")
        for i, flag in enumerate(sub.flags):
            if flag not in RESPONSE_FLAGS:
                ctx.error(item(fpath, i), f"{flag!r} is not a response flag")
        return AccessLogFilter(kind, flags=tuple(sub.flags))
    # and_filter, or_filter
    ctx.fields(sub, spath, _FILTERS)
    fpath = join(spath, "filters")
    if len(sub.filters) < 2:
        ctx.error(fpath, "needs at least 2 filters")
    subs = [access_log_filter(ctx, f, item(fpath, i)) for i, f in enumerate(sub.filters)]
    return AccessLogFilter(kind, filters=tuple(f for f in subs if f is not None))
