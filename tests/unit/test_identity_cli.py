"""``ubimesh certs status``'s expiry warnings, and ``ubimesh ca`` on local files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from tests.support.pki import Pki, key_pem

from ubimesh.cli.main import main
from ubimesh.control.identity_metrics import expiry_warning

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
H, D = dt.timedelta(hours=1), dt.timedelta(days=1)


def test_a_leaf_warns_in_the_last_fifth_of_its_life() -> None:
    start = NOW - 12 * H
    assert expiry_warning(start, start + 24 * H, ca=False, now=NOW) == ""
    start = NOW - 20 * H
    assert expiry_warning(start, start + 24 * H, ca=False, now=NOW) == "expires in 4.0 h"
    assert expiry_warning(NOW - 25 * H, NOW - H, ca=False, now=NOW) == "EXPIRED"


def test_a_ca_certificate_warns_a_week_ahead_at_the_latest() -> None:
    # 30-day intermediate with 8 days left: 20% is 6 days, the week rule wins only below 7.
    assert expiry_warning(NOW - 22 * D, NOW + 8 * D, ca=True, now=NOW) == ""
    assert expiry_warning(NOW - 24 * D, NOW + 6 * D, ca=True, now=NOW) == "expires in 6.0 d"
    # 10-year root with 1.5 years left: inside the last 20%.
    assert expiry_warning(NOW - 3102 * D, NOW + 548 * D, ca=True, now=NOW).startswith(
        "expires in")


def test_ca_import_and_status_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = Pki("example.org")
    files = pki.write(tmp_path / "pki")
    data = str(tmp_path / "data")
    assert main(["ca", "import", "--data-dir", data, "--trust-domain", "example.org",
                 "--cert", str(files["intermediate"]), "--key", str(files["intermediate_key"]),
                 "--chain", str(files["root"])]) == 0
    out = capsys.readouterr().out
    assert "imported a CA (imported-intermediate)" in out
    assert "CN=example.org root" in out and "CN=example.org intermediate" in out
    assert main(["ca", "status", "--data-dir", data]) == 0
    assert "spiffe://example.org" in capsys.readouterr().out
    # A leaf is not a CA: refused with the reason, exit 1.
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pki.leaf()[0].split(b"-----END CERTIFICATE-----\n")[0]
                     + b"-----END CERTIFICATE-----\n")
    (tmp_path / "leaf.key").write_bytes(key_pem(pki.root_key))
    assert main(["ca", "import", "--data-dir", str(tmp_path / "other"), "--cert", str(leaf),
                 "--key", str(tmp_path / "leaf.key")]) == 1
    assert "not a CA certificate" in capsys.readouterr().err
    assert main(["ca", "status", "--data-dir", str(tmp_path / "none")]) == 1
    assert "ubimesh ca init" in capsys.readouterr().err
