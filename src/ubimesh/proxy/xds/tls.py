"""envoy.extensions.transport_sockets.tls.v3: TLS contexts and SDS secrets.

``transport_socket`` translates a filter chain's DownstreamTlsContext or a cluster's
UpstreamTlsContext into a frozen ``TlsContext``; ``static_secrets`` translates
``static_resources.secrets``. Certificates and keys are read when the config is loaded (as
Envoy does); an SDS reference is kept by name and resolved at run time against
``Snapshot.secrets``, so that a rotated secret does not change the listener or cluster.

SDS references (``SdsSecretConfig``): without ``sds_config`` the secret must be one of
``static_resources.secrets`` (Envoy's static secrets); with ``sds_config: {ads: {}}`` it comes
over the ADS stream (``sds[NAME]``), and translating a bootstrap alone (no stream yet) only
checks the reference, as for RDS and EDS.
"""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.types import (
    CertificateValidation,
    SanMatcher,
    SanType,
    Secret,
    StringMatcher,
    StringMatchKind,
    TlsCertificate,
    TlsContext,
    TlsVersion,
)
from ubimesh.proxy.tls import context as contexts
from ubimesh.proxy.xds import common, dynamic, extensions
from ubimesh.proxy.xds.context import Ctx, is_within, item, join, seconds, wrapped
from ubimesh.proxy.xds.route import data_source

_NOT_YET = "not implemented yet"

_TRANSPORT_SOCKET = {"name", "typed_config"}
_DOWNSTREAM = {"common_tls_context", "require_client_certificate"}
_DOWNSTREAM_HINTS = {
    "require_sni": "requiring SNI is " + _NOT_YET + "; match on server_names instead",
    "session_ticket_keys": "session ticket keys are " + _NOT_YET,
    "session_ticket_keys_sds_secret_config": "session ticket keys are " + _NOT_YET,
    "session_timeout": "the session timeout is " + _NOT_YET,
    "ocsp_staple_policy": "OCSP stapling is " + _NOT_YET,
}
_UPSTREAM = {"common_tls_context", "sni"}
_UPSTREAM_HINTS = {
    "auto_host_sni": "auto SNI is " + _NOT_YET + "; set sni",
    "auto_sni_san_validation": "auto SNI is " + _NOT_YET + "; use a SAN matcher",
    "allow_renegotiation": "TLS renegotiation is not supported",
    "max_session_keys": "session resumption settings are " + _NOT_YET,
}
_COMMON = {
    "tls_params",
    "tls_certificates",
    "tls_certificate_sds_secret_configs",
    "validation_context",
    "validation_context_sds_secret_config",
    "combined_validation_context",
    "alpn_protocols",
}
_PROVIDER_HINT = "certificate provider instances are " + _NOT_YET + "; use SDS"
_COMMON_HINTS = {
    "tls_certificate_provider_instance": _PROVIDER_HINT,
    "tls_certificate_certificate_provider": _PROVIDER_HINT,
    "tls_certificate_certificate_provider_instance": _PROVIDER_HINT,
    "validation_context_certificate_provider": _PROVIDER_HINT,
    "validation_context_certificate_provider_instance": _PROVIDER_HINT,
    "custom_handshaker": "custom handshakers are not implemented",
    "custom_tls_certificate_selector": "custom certificate selectors are not implemented",
    "key_log": "TLS key logging is " + _NOT_YET,
}
_COMBINED = {"default_validation_context", "validation_context_sds_secret_config"}
_COMBINED_HINTS = {
    "validation_context_certificate_provider": _PROVIDER_HINT,
    "validation_context_certificate_provider_instance": _PROVIDER_HINT,
}
_TLS_PARAMS = {"tls_minimum_protocol_version", "tls_maximum_protocol_version"}
_TLS_PARAMS_HINTS = {
    "cipher_suites": "ubimesh uses OpenSSL's default cipher suites",
    "ecdh_curves": "ubimesh uses OpenSSL's default curves",
    "signature_algorithms": "ubimesh uses OpenSSL's default signature algorithms",
    "compliance_policies": "compliance policies are not implemented",
}
_CERTIFICATE = {"certificate_chain", "private_key"}
_CERTIFICATE_HINTS = {
    "password": "encrypted private keys are " + _NOT_YET,
    "pkcs12": "PKCS#12 is " + _NOT_YET + "; use PEM certificate_chain and private_key",
    "watched_directory": "watched directories are " + _NOT_YET + "; reload or use SDS",
    "private_key_provider": "private key providers are not implemented",
    "ocsp_staple": "OCSP stapling is " + _NOT_YET,
    "signed_certificate_timestamp": "SCTs are " + _NOT_YET,
}
_VALIDATION = {"trusted_ca", "match_typed_subject_alt_names"}
_VALIDATION_HINTS = {
    "match_subject_alt_names": "deprecated in Envoy; use match_typed_subject_alt_names",
    "verify_certificate_spki": "SPKI pinning is " + _NOT_YET,
    "verify_certificate_hash": "certificate hash pinning is " + _NOT_YET,
    "crl": "CRLs are " + _NOT_YET,
    "allow_expired_certificate": "expired certificates are always refused",
    "trust_chain_verification": "the chain is always verified",
    "custom_validator_config": "custom validators are " + _NOT_YET + "; ubimesh checks SPIFFE "
    "leaves itself (one URI SAN, CA:false, key usage) and picks the roots by trust domain",
    "system_root_certs": "the system's roots are " + _NOT_YET + "; give trusted_ca",
    "watched_directory": "watched directories are " + _NOT_YET + "; reload or use SDS",
}
_SAN_MATCHER = {"san_type", "matcher"}
_SAN_MATCHER_HINTS = {"oid": "OTHER_NAME SANs are not implemented"}
_SAN_TYPES = {2: SanType.DNS, 3: SanType.URI}
_SAN_TYPE_NAMES = {1: "EMAIL", 4: "IP_ADDRESS", 5: "OTHER_NAME"}
_MATCH_KINDS = {
    SanType.URI: (StringMatchKind.EXACT, StringMatchKind.PREFIX),
    SanType.DNS: (StringMatchKind.EXACT,),
}
_SDS_CONFIG = {"name", "sds_config"}
_SECRET = {"name", "tls_certificate", "validation_context"}
_SECRET_HINTS = {
    "session_ticket_keys": "session ticket keys are " + _NOT_YET,
    "generic_secret": "generic secrets are " + _NOT_YET,
}
_VERSIONS = {3: TlsVersion.TLSv1_2, 4: TlsVersion.TLSv1_3}
_VERSION_NAMES = {1: "TLSv1_0", 2: "TLSv1_1"}

#: Envoy's default handshake time limit is none; ubimesh bounds every wait.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


def transport_socket(ctx: Ctx, msg: Any, path: str, *, server: bool) -> TlsContext | None:
    """envoy.config.core.v3.TransportSocket of a filter chain (``server``) or a cluster: a
    DownstreamTlsContext or UpstreamTlsContext (``envoy.transport_sockets.tls``)."""
    ctx.fields(msg, path, _TRANSPORT_SOCKET)
    tpath = join(path, "typed_config")
    handlers = (
        extensions.DOWNSTREAM_TRANSPORT_SOCKETS if server else extensions.UPSTREAM_TRANSPORT_SOCKETS
    )
    if any(is_within(tpath, q) for q in ctx.quiet):
        # The parser could not read the typed_config: a type ubimesh does not implement
        # (raw_buffer, ALTS, ...). The transport socket as a whole is what is not supported.
        ctx.unsupported(
            path,
            "this transport socket type; only TLS (envoy.transport_sockets.tls) is, with "
            + ", ".join(handlers),
        )
        return None
    if not msg.HasField("typed_config"):
        ctx.error(tpath, f"is required (no typed_config for transport socket {msg.name!r})")
        return None
    name = extensions.type_name(msg.typed_config.type_url)
    if name not in handlers:
        # Another transport socket (raw_buffer, ALTS, ...): the transport socket as a whole is
        # what ubimesh does not support.
        ctx.unsupported(
            path,
            f"transport socket type {name or '(none)'}; only TLS (envoy.transport_sockets.tls) "
            f"is, with {', '.join(handlers)}",
        )
        return None
    where = "on a filter chain" if server else "on a cluster"
    config = extensions.unpack(ctx, msg.typed_config, tpath, handlers, where)
    if config is None:
        return None
    if server:
        return _downstream(ctx, config, tpath)
    return _upstream(ctx, config, tpath)


def handshake_timeout(msg: Any) -> float:
    """FilterChain.transport_socket_connect_timeout (unset or 0: ubimesh's bound)."""
    if msg.HasField("transport_socket_connect_timeout"):
        value = seconds(msg.transport_socket_connect_timeout)
        if value > 0:
            return value
    return DEFAULT_HANDSHAKE_TIMEOUT


def _downstream(ctx: Ctx, msg: Any, path: str) -> TlsContext:
    ctx.fields(msg, path, _DOWNSTREAM, _DOWNSTREAM_HINTS)
    context = _common(ctx, msg.common_tls_context, join(path, "common_tls_context"), server=True)
    require = wrapped(msg, "require_client_certificate", False)
    if require and context.validation is None and not context.validation_secret:
        ctx.error(
            join(path, "require_client_certificate"),
            "needs a validation context with trusted_ca to verify the client certificate "
            "(common_tls_context.validation_context or validation_context_sds_secret_config)",
        )
    return _replace(context, require_client_certificate=require)


def _upstream(ctx: Ctx, msg: Any, path: str) -> TlsContext:
    ctx.fields(msg, path, _UPSTREAM, _UPSTREAM_HINTS)
    context = _common(ctx, msg.common_tls_context, join(path, "common_tls_context"), server=False)
    return _replace(context, sni=msg.sni)


def _replace(context: TlsContext, **changes: Any) -> TlsContext:
    import dataclasses

    return dataclasses.replace(context, **changes)


def _common(ctx: Ctx, msg: Any, path: str, *, server: bool) -> TlsContext:
    """CommonTlsContext."""
    ctx.fields(msg, path, _COMMON, _COMMON_HINTS)
    min_version, max_version = TlsVersion.TLSv1_2, TlsVersion.TLSv1_3
    if msg.HasField("tls_params"):
        min_version, max_version = _tls_params(ctx, msg.tls_params, join(path, "tls_params"))
    elif not server:
        # Envoy's client default: TLS 1.2 at most.
        max_version = TlsVersion.TLSv1_2

    cpath = join(path, "tls_certificates")
    certificates = []
    for i, cert in enumerate(msg.tls_certificates):
        translated = tls_certificate(ctx, cert, item(cpath, i))
        if translated is not None:
            certificates.append(translated)
    spath = join(path, "tls_certificate_sds_secret_configs")
    secrets = tuple(
        sds_reference(ctx, ref, item(spath, i), "tls_certificate")
        for i, ref in enumerate(msg.tls_certificate_sds_secret_configs)
    )
    count = len(msg.tls_certificates) + len(msg.tls_certificate_sds_secret_configs)
    if count > 1:
        ctx.unsupported(
            cpath if len(msg.tls_certificates) > 1 else spath,
            "one certificate per TLS context (ubimesh does not choose among several)",
        )
    if server and count == 0:
        ctx.error(
            cpath,
            "a server TLS context needs a certificate: set tls_certificates or "
            "tls_certificate_sds_secret_configs",
        )

    validation: CertificateValidation | None = None
    validation_secret = ""
    which = [
        name
        for name in (
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
        )
        if msg.HasField(name)
    ]
    if "validation_context" in which:
        validation = validation_context(ctx, msg.validation_context, join(path, which[0]))
    elif "validation_context_sds_secret_config" in which:
        validation_secret = sds_reference(
            ctx,
            msg.validation_context_sds_secret_config,
            join(path, "validation_context_sds_secret_config"),
            "validation_context",
        )
    elif "combined_validation_context" in which:
        validation, validation_secret = _combined(
            ctx, msg.combined_validation_context, join(path, "combined_validation_context")
        )
    return TlsContext(
        server=server,
        certificates=tuple(certificates),
        certificate_secrets=tuple(s for s in secrets if s),
        validation=validation,
        validation_secret=validation_secret,
        alpn_protocols=tuple(msg.alpn_protocols),
        min_version=min_version,
        max_version=max_version,
    )


def _combined(ctx: Ctx, msg: Any, path: str) -> tuple[CertificateValidation | None, str]:
    """CombinedCertificateValidationContext: a default part and an SDS secret merged into it."""
    ctx.fields(msg, path, _COMBINED, _COMBINED_HINTS)
    default = CertificateValidation()
    if msg.HasField("default_validation_context"):
        default = validation_context(
            ctx,
            msg.default_validation_context,
            join(path, "default_validation_context"),
            needs_ca=False,
        )
    name = ""
    if msg.HasField("validation_context_sds_secret_config"):
        name = sds_reference(
            ctx,
            msg.validation_context_sds_secret_config,
            join(path, "validation_context_sds_secret_config"),
            "validation_context",
        )
    return default, name


def _tls_params(ctx: Ctx, msg: Any, path: str) -> tuple[TlsVersion, TlsVersion]:
    ctx.fields(msg, path, _TLS_PARAMS, _TLS_PARAMS_HINTS)
    out = []
    for name, default in (
        ("tls_minimum_protocol_version", TlsVersion.TLSv1_2),
        ("tls_maximum_protocol_version", TlsVersion.TLSv1_3),
    ):
        value = getattr(msg, name)
        if value == 0:  # TLS_AUTO
            out.append(default)
        elif value in _VERSIONS:
            out.append(_VERSIONS[value])
        else:
            label = _VERSION_NAMES.get(value, str(value))
            ctx.unsupported(
                join(path, name), f"{label}; ubimesh speaks TLS 1.2 and 1.3 (TLSv1_2, TLSv1_3)"
            )
            out.append(default)
    low, high = out
    if low > high:
        ctx.error(
            path,
            f"tls_minimum_protocol_version {low.name} is above tls_maximum_protocol_version "
            f"{high.name}",
        )
    return low, high


def tls_certificate(ctx: Ctx, msg: Any, path: str) -> TlsCertificate | None:
    """TlsCertificate: a PEM chain (leaf first) and its PEM private key, both required."""
    ctx.fields(msg, path, _CERTIFICATE, _CERTIFICATE_HINTS)
    parts: list[bytes] = []
    sources: list[str] = []
    for name in ("certificate_chain", "private_key"):
        fpath = join(path, name)
        if not msg.HasField(name):
            ctx.error(fpath, "is required")
            continue
        source = getattr(msg, name)
        data = data_source(ctx, source, fpath)
        if data is None:
            continue
        if b"-----BEGIN" not in data:
            ctx.error(fpath, f"is not PEM (no '-----BEGIN' line): give the {name} in PEM")
            continue
        parts.append(data)
        sources.append(source.filename or "inline")
    if len(parts) != 2:
        return None
    certificate = TlsCertificate(parts[0], parts[1], source=", ".join(sources))
    problem = contexts.check_certificate(certificate)
    if problem:
        ctx.error(path, f"cannot load the certificate_chain and private_key: {problem}")
        return None
    return certificate


def validation_context(
    ctx: Ctx, msg: Any, path: str, *, needs_ca: bool = True
) -> CertificateValidation:
    """CertificateValidationContext: trusted_ca (PEM roots) and URI/DNS SAN matchers."""
    ctx.fields(msg, path, _VALIDATION, _VALIDATION_HINTS)
    trusted = b""
    cpath = join(path, "trusted_ca")
    if msg.HasField("trusted_ca"):
        data = data_source(ctx, msg.trusted_ca, cpath)
        if data is not None:
            problem = (
                "holds no PEM certificate ('-----BEGIN CERTIFICATE-----')"
                if b"-----BEGIN CERTIFICATE-----" not in data
                else contexts.check_roots(data)
            )
            if problem:
                ctx.error(cpath, f"cannot load the roots: {problem}")
            trusted = data
    mpath = join(path, "match_typed_subject_alt_names")
    translated = [
        san_matcher(ctx, m, item(mpath, i))
        for i, m in enumerate(msg.match_typed_subject_alt_names)
    ]
    matchers = tuple(m for m in translated if m is not None)
    if needs_ca and not msg.HasField("trusted_ca"):
        # Envoy: "SAN-based verification of peer certificates without trusted CA is insecure
        # and not allowed"; without matchers a context with no CA verifies nothing, which
        # ubimesh refuses too rather than accept any certificate silently.
        ctx.error(cpath, "is required: without it no peer certificate can be verified")
    return CertificateValidation(trusted, matchers)


def san_matcher(ctx: Ctx, msg: Any, path: str) -> SanMatcher | None:
    """SubjectAltNameMatcher: URI (exact or prefix) or DNS (exact)."""
    ctx.fields(msg, path, _SAN_MATCHER, _SAN_MATCHER_HINTS)
    san_type = _SAN_TYPES.get(msg.san_type)
    if san_type is None:
        if msg.san_type != 0:  # 0 is refused by Envoy's own rule (defined_only, not_in [0])
            name = _SAN_TYPE_NAMES.get(msg.san_type, str(msg.san_type))
            ctx.unsupported(join(path, "san_type"), f"SAN type {name}; URI and DNS are")
        return None
    mpath = join(path, "matcher")
    if not msg.HasField("matcher"):
        return None  # the constraint check reported it
    matcher = common.string_matcher(ctx, msg.matcher, mpath)
    if matcher is None:
        return None
    allowed = _MATCH_KINDS[san_type]
    if matcher.kind not in allowed or matcher.ignore_case:
        kinds = " or ".join(k.value for k in allowed)
        ctx.unsupported(
            mpath,
            f"a {san_type.name} SAN matcher with {matcher.kind.value}"
            f"{' and ignore_case' if matcher.ignore_case else ''}; ubimesh matches {san_type.name} "
            f"SANs with {kinds}",
        )
        return None
    return SanMatcher(san_type, StringMatcher(matcher.kind, matcher.value))


def sds_reference(ctx: Ctx, msg: Any, path: str, kind: str) -> str:
    """SdsSecretConfig: the secret's name, once it is known to exist with content ``kind``
    ("tls_certificate" or "validation_context")."""
    ctx.fields(msg, path, _SDS_CONFIG)
    name: str = msg.name
    if not name:
        return ""  # the constraint check reported it
    npath = join(path, "name")
    if not msg.HasField("sds_config"):
        found = ctx.static_secrets.get(name)
        if found is None:
            ctx.error(
                npath,
                f"no secret {name!r} in static_resources.secrets (a reference without "
                "sds_config names a static secret)",
            )
            return name
        _check_kind(ctx, found, name, kind, npath)
        return name
    cpath = join(path, "sds_config")
    dynamic.config_source(ctx, msg.sds_config, cpath)
    if ctx.dynamic is None:
        return name  # a bootstrap alone: the reference is checked, resolved once delivered
    delivered = ctx.dynamic.of(dynamic.SECRET_TYPE).get(name)
    if delivered is None:
        ctx.error(npath, f"Secret {name!r} has not been received over ADS")
        return name
    if name not in ctx.sds_secrets:
        spath = dynamic.resource_path(dynamic.SECRET_TYPE, name)
        translated = secret(ctx, delivered, spath)
        if translated is None:
            return name
        ctx.sds_secrets[name] = translated
    _check_kind(ctx, ctx.sds_secrets[name], name, kind, npath)
    return name


def _check_kind(ctx: Ctx, found: Secret, name: str, kind: str, path: str) -> None:
    has = "tls_certificate" if isinstance(found, TlsCertificate) else "validation_context"
    if has != kind:
        ctx.error(path, f"secret {name!r} holds a {has}, and a {kind} is needed here")


def secret(ctx: Ctx, msg: Any, path: str) -> Secret | None:
    """envoy.extensions.transport_sockets.tls.v3.Secret: a tls_certificate or a
    validation_context."""
    ctx.fields(msg, path, _SECRET, _SECRET_HINTS)
    if msg.HasField("tls_certificate"):
        return tls_certificate(ctx, msg.tls_certificate, join(path, "tls_certificate"))
    if msg.HasField("validation_context"):
        return validation_context(ctx, msg.validation_context, join(path, "validation_context"))
    if not any(ctx.is_refused(join(path, fd.name)) for fd, _ in msg.ListFields()):
        ctx.error(path, "needs tls_certificate or validation_context")
    return None


def static_secrets(ctx: Ctx, msgs: Any, path: str) -> dict[str, Secret]:
    """static_resources.secrets: every secret by name (names unique and required)."""
    out: dict[str, Secret] = {}
    where: dict[str, str] = {}
    for i, msg in enumerate(msgs):
        spath = item(path, i)
        if not msg.name:
            ctx.error(join(spath, "name"), "is required for a static secret")
        elif msg.name in where:
            ctx.error(
                join(spath, "name"), f"duplicate secret {msg.name!r} (also at {where[msg.name]})"
            )
            continue
        translated = secret(ctx, msg, spath)
        if msg.name:
            where[msg.name] = spath
            if translated is not None:
                out[msg.name] = translated
    return out
