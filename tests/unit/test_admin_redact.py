"""/config_dump never shows an inline private key (Envoy shows "[redacted]" in its place)."""

from __future__ import annotations

from ubimesh.proxy.admin import REDACTED, redact_private_keys


def test_inline_private_keys_are_redacted_and_file_names_kept() -> None:
    dump = {
        "configs": [
            {
                "secrets": [
                    {"tls_certificate": {
                        "certificate_chain": {"inline_bytes": "Q0VSVA=="},
                        "private_key": {"inline_bytes": "S0VZ"},
                        "password": {"inline_string": "hunter2"},
                    }},
                    {"tls_certificate": {"private_key": {"filename": "/etc/key.pem"}}},
                ]
            }
        ]
    }
    out = redact_private_keys(dump)
    first, second = out["configs"][0]["secrets"]
    assert first["tls_certificate"]["private_key"] == REDACTED
    assert first["tls_certificate"]["password"] == REDACTED
    assert first["tls_certificate"]["certificate_chain"] == {"inline_bytes": "Q0VSVA=="}
    assert second["tls_certificate"]["private_key"] == {"filename": "/etc/key.pem"}
    assert "S0VZ" not in repr(out) and "hunter2" not in repr(out)
