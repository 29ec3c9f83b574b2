"""Differential suite: the same bootstrap through Envoy and through ubimesh, compared.

Every case file under ``cases/`` holds one bootstrap template and a list of cases.  For each
file the harness renders the bootstrap twice (each proxy gets its own listener and admin ports;
both route to the same in-process echo upstreams, ``tests/support/echo_upstream.py``), starts
the real ``envoy`` (the reference) and ``ubimesh proxy`` (the subject) once, sends each case's
requests to both, and asserts that the normalised observations are equal.

What one request's observation holds:

* status code, reason phrase, HTTP version of the response, or the error if none came;
* the response headers the client saw, as ``[name, value]`` pairs with names exactly as
  received, sorted by name (order between different names carries no meaning in HTTP; the
  order of repeated names is kept);
* the response body: for an echo answer, which upstream's record it is (after checking it is
  byte-for-byte the JSON of a request that upstream logged); otherwise the body text (a direct
  response, a local reply), or its length and digest when long or binary;
* every request that reached any echo upstream while the request was in flight (mirrors
  included): upstream name, method, request target exactly as received, version, headers
  (names as sent, same ordering rule), body length and digest, chunked or not, trailers.

Normalisation, i.e. what is deliberately *not* compared, and why:

* Port numbers: each proxy has its own listener and admin ports, and the client's ephemeral port
  differs per request.  ``:PORT`` inside any value (and a value that is a whole port) is replaced
  by ``${LISTENER:name}``, ``${ADMIN_PORT}``, ``${UPSTREAM:name}`` or ``${CLIENT_PORT}``.  This
  is what makes ``Host: 127.0.0.1:PORT`` and ``%DOWNSTREAM_REMOTE_ADDRESS%`` comparable.
* ``x-request-id`` sent upstream: a generated UUID is random, so a value of UUID form that the
  client did not send becomes ``<generated-uuid>``; presence and form are still compared, and
  a value the client sent is compared exactly.
* ``date`` in responses: compared as ``<http-date>`` (presence and format only).
* ``x-envoy-upstream-service-time`` in responses: a duration; compared as ``<ms>`` (presence
  and that it is an integer).
* ``server`` in responses: ``envoy`` and ``ubimesh`` (each one's own default name when the
  bootstrap sets no ``server_name``) both become ``<proxy-default>``; any other value, e.g. one
  configured with ``server_name``, is compared exactly.
* ``content-length`` in responses: when it equals the length of the body received it becomes
  ``<length of body>`` (the body itself is compared, and echo bodies contain port numbers whose
  digit count may differ); for HEAD answered by an echo upstream it is ``<echo length>``.

Compared exactly on purpose, although one might expect otherwise:

* ``x-envoy-expected-rq-timeout-ms``: Envoy's router sends it upstream on every routed request
  (the route timeout, 15000 by default).  It is deterministic and visible to upstream
  applications, so an Envoy-compatible proxy must send it with the same value; a difference is
  reported rather than hidden.  Only when the upstreams of one request saw different values
  (a retry carries what is left of the route timeout, which depends on timing) do they all
  become ``<remaining ms>``.
* ``x-forwarded-for``, ``x-forwarded-proto``, ``x-envoy-internal``: everything runs on loopback,
  so their values are deterministic.
* ``user-agent``, ``accept-encoding``: the clients send none unless a case says so.

Choosing the subject: by default ubimesh (skipped if ``ubimesh proxy --help`` does not run,
unless ``UBIMESH_DIFF_REQUIRE=1``).  ``UBIMESH_DIFF_SUBJECT=envoy`` or ``--differential-self``
(when pytest is pointed at tests/interop) compares Envoy with a second Envoy instead, which
proves that the harness itself is deterministic.

``UBIMESH_DIFF_DUMP=DIR`` writes both sides' observations of every case to DIR as JSON.

Each case also states a few sanity expectations (status, which upstream, ...).  They are
checked against Envoy, so a case whose bootstrap does not do what the case claims is reported
as a broken case instead of passing vacuously.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.differential import (
    Case,
    ProxyFarm,
    Suite,
    check_expectations,
    describe_difference,
    load_suites,
    run_case,
)
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import ProcessStartError, envoy_binary, ubimesh_available

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary on PATH"),
]

CASES_DIR = Path(__file__).parent / "cases"
SUITES = load_suites(CASES_DIR)
CASES: list[Case] = [case for suite in SUITES for case in suite.cases]


def _subject_kind(config: pytest.Config) -> str:
    if os.environ.get("UBIMESH_DIFF_SUBJECT", "").strip().lower() == "envoy":
        return "envoy"
    try:
        if config.getoption("--differential-self"):
            return "envoy"
    except ValueError:
        pass  # the option is only registered when tests/interop/conftest.py was loaded early
    return "ubimesh"


@pytest.fixture(scope="module")
def echo_pool() -> Iterator[EchoServerPool]:
    pool = EchoServerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def farm(
    request: pytest.FixtureRequest,
    echo_pool: EchoServerPool,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyFarm]:
    kind = _subject_kind(request.config)
    if kind == "ubimesh":
        ok, why = ubimesh_available()
        if not ok:
            message = f"`ubimesh proxy` is not runnable yet:\n{why}"
            if os.environ.get("UBIMESH_DIFF_REQUIRE") == "1":
                pytest.fail(message)
            pytest.skip(message)
    # The suites in the order the selected cases will run, so the farm can start the next
    # suite's proxies early (and only for suites that will run).
    order: list[Suite] = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        if isinstance(case, Case) and case.suite not in order:
            order.append(case.suite)
    proxies = ProxyFarm(echo_pool, tmp_path_factory.mktemp("differential"), kind, order)
    try:
        yield proxies
    finally:
        proxies.close()


def test_enough_cases() -> None:
    assert len(CASES) >= 45, f"only {len(CASES)} differential cases"
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_differential(case: Case, farm: ProxyFarm, echo_pool: EchoServerPool) -> None:
    start_error = None
    try:
        ref, sub = farm.proxies(case.suite)
    except ProcessStartError as exc:
        start_error = str(exc)
    if start_error is not None:
        pytest.fail(start_error, pytrace=False)
    self_mode = farm.subject_kind == "envoy"

    ref_obs = run_case(echo_pool, ref, case)
    broken = [
        f"request #{i} ({spec.label()}): {problem}"
        for i, (spec, obs) in enumerate(zip(case.requests, ref_obs, strict=True))
        for problem in check_expectations(spec, obs)
    ]
    if broken:
        pytest.fail(
            f"case {case.id} does not hold against Envoy itself (fix the case):\n  "
            + "\n  ".join(broken)
            + f"\nbootstrap: {ref.config_path}\n{ref.proc.describe()}",
            pytrace=False,
        )

    sub_obs = run_case(echo_pool, sub, case)
    if self_mode:
        for i, (spec, obs) in enumerate(zip(case.requests, sub_obs, strict=True)):
            problems = check_expectations(spec, obs)
            assert not problems, f"second Envoy, request #{i}: {problems}"

    dump_dir = os.environ.get("UBIMESH_DIFF_DUMP")
    if dump_dir:
        out = Path(dump_dir) / f"{case.suite.name}__{case.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({ref.label: ref_obs, sub.label: sub_obs}, indent=2))

    for proxy in (ref, sub):
        if not proxy.proc.alive:
            pytest.fail(f"{proxy.label} died during case {case.id}\n{proxy.proc.describe()}")

    if ref_obs != sub_obs:
        pytest.fail(
            describe_difference(case, ref.label, sub.label, ref_obs, sub_obs)
            + f"\n\nbootstraps: {ref.config_path} | {sub.config_path}\n"
            + sub.proc.describe(),
            pytrace=False,
        )
