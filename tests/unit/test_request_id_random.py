"""x-request-id values: UUID4s from random bytes drawn in batches; a forked worker never
repeats the ids its parent has drawn but not yet used."""

from __future__ import annotations

import os
import uuid

from ubimesh.proxy.network.hcm_config import _IDS_PER_DRAW, new_request_id


def test_ids_are_distinct_uuid4s_across_batches() -> None:
    ids = [new_request_id() for _ in range(3 * _IDS_PER_DRAW + 7)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        value = uuid.UUID(text)
        assert value.version == 4 and value.variant == uuid.RFC_4122 and str(value) == text


def test_a_forked_child_draws_its_own_ids() -> None:
    new_request_id()  # the parent now holds a batch with ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, ",".join(new_request_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    parent = [new_request_id() for _ in range(5)]
    assert len(child) == 5 and not set(child) & set(parent)
