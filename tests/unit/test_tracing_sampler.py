"""The trace decision (ubimesh.proxy.tracing.sampler), as Envoy's UUID request id extension and
mutateTracingRequestHeader make it: the decision lives in the x-request-id's 15th character."""

from __future__ import annotations

from ubimesh.proxy.tracing import sampler

RID = "00000063-1891-4d4c-8964-998ede09d368"  # first 8 hex digits = 99: draw 99 of 10000
ALL = sampler.percent_numerator(100)


def decide(rid: str | None, *, client: bool = False, force: bool = False, random_: float = 100,
           overall: float = 100, client_pct: float = 100) -> tuple[int, str | None]:
    return sampler.decide(rid, client_trace_id=client, force_trace=force,
                          client=sampler.percent_numerator(client_pct),
                          random_=sampler.percent_numerator(random_),
                          overall=sampler.percent_numerator(overall))  # fmt: skip


def test_reason_packing_round_trips() -> None:
    for reason, nibble in [(sampler.SAMPLING, "9"), (sampler.SERVICE_FORCED, "a"),
                           (sampler.CLIENT_FORCED, "b"), (sampler.NOT_TRACEABLE, "4")]:
        packed = sampler.with_reason(RID, reason)
        assert packed[14] == nibble and packed[:14] == RID[:14] and packed[15:] == RID[15:]
        assert sampler.trace_reason(packed) == reason
    assert sampler.with_reason("not-a-uuid", sampler.SAMPLING) == "not-a-uuid"
    assert sampler.trace_reason("not-a-uuid") == sampler.NOT_TRACEABLE


def test_random_sampling_uses_the_request_id() -> None:
    assert decide(RID, random_=1) == (sampler.SAMPLING, sampler.with_reason(RID, 1))
    assert decide(RID, random_=0.99) == (sampler.NOT_TRACEABLE, RID)  # 99 < 99 is false
    assert decide(RID, random_=0.1) == (sampler.NOT_TRACEABLE, RID)
    assert decide(None) == (sampler.NOT_TRACEABLE, None)
    assert decide("zzzzzzzz-not-hex") == (sampler.NOT_TRACEABLE, "zzzzzzzz-not-hex")


def test_an_incoming_decision_is_kept_and_overall_caps_everything() -> None:
    sampled = sampler.with_reason(RID, sampler.SAMPLING)
    assert decide(sampled, random_=0) == (sampler.SAMPLING, sampled)
    reason, rid = decide(sampled, overall=0.5)
    assert reason == sampler.NOT_TRACEABLE and rid is not None and rid[14] == "4"
    assert decide(RID, overall=0.5)[0] == sampler.NOT_TRACEABLE


def test_client_and_forced_traces() -> None:
    assert decide(RID, client=True, random_=0)[0] == sampler.CLIENT_FORCED
    assert decide(RID, client=True, random_=0, client_pct=0)[0] == sampler.NOT_TRACEABLE
    assert decide(RID, force=True, random_=0)[0] == sampler.SERVICE_FORCED
    assert decide(RID, client=True, force=True)[1][14] == "b"  # type: ignore[index]


def test_a_generated_id_draws_from_its_bytes_as_from_its_text() -> None:
    # The HCM notes the id it generates (sampler.GENERATED): decide then reads the draw from
    # the random bytes. It must be the draw the text spells, and only that very string gets it.
    from ubimesh.proxy.network.hcm_config import new_request_id

    for _ in range(300):
        rid = new_request_id()
        assert sampler.GENERATED.text is rid
        copy = "".join(list(rid))  # equal, but not the generated object: parsed
        assert copy is not rid
        for pct in (0.5, 1, 20, 50, 99.99):
            assert decide(rid, random_=pct) == decide(copy, random_=pct)
        raw, at = sampler.GENERATED.raw, sampler.GENERATED.at
        assert int(rid[:8], 16) == int.from_bytes(raw[at : at + 4], "big")


def test_a_decision_is_written_into_the_version_nibble_whatever_else_the_id_holds() -> None:
    # with_reason replaces the first "-4" when that is the dash before a "4" nibble, and
    # slices otherwise: both must give the nibble-at-14 rewrite, also when a "-4" comes
    # earlier (after the first dash, or anywhere in a 36-character id that is no UUID).
    def by_slices(rid: str, reason: int) -> str:
        return rid[:14] + "49ab"[reason] + rid[15:]

    ids = (
        "0e1f2a3b-4891-4d4c-8964-998ede09d368",  # a "-4" at 8 too
        "0e1f2a3b-1891-4d4c-8964-998ede09d368",
        "0e1f2a3b-1891-1d4c-8964-998ede09d368",  # nibble "1": no replace
        "-4aaaaaaaaaaaa4aaaaaaaaaaaaaaaaaaaaa",  # 36 characters, a "-4" first
        "aaaaaaaaaaaaa-4aaaaaaaaaaa-4aaaaaaaa",
    )
    reasons = (sampler.NOT_TRACEABLE, sampler.SAMPLING, sampler.SERVICE_FORCED,
               sampler.CLIENT_FORCED)  # fmt: skip
    for rid in ids:
        for reason in reasons:
            assert sampler.with_reason(rid, reason) == by_slices(rid, reason), (rid, reason)
    from ubimesh.proxy.network.hcm_config import new_request_id

    for _ in range(300):
        rid = new_request_id()
        copy = "".join(list(rid))  # equal, but not the generated object
        assert decide(rid, client=True, random_=0) == decide(copy, client=True, random_=0)
        assert decide(rid, force=True, random_=0) == decide(copy, force=True, random_=0)
        assert decide(rid) == decide(copy)
        assert decide(rid, overall=0) == (sampler.NOT_TRACEABLE, rid)
        for reason in reasons:
            assert sampler.with_reason(rid, reason) == by_slices(rid, reason)
