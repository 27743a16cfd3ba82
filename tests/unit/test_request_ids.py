"""Request ids: 'req_' and 24 hex digits of kernel randomness, unique across batches and across a fork."""
from __future__ import annotations

import os
import re

import auth


def test_ids_are_unique_across_batches() -> None:
    ids = [auth.new_request_id() for _ in range(3 * 1024 + 5)]  # three refills and a bit
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    auth.new_request_id()  # the parent has a batch in hand
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, " ".join(auth.new_request_id() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [auth.new_request_id() for _ in range(4)]
    assert len(child) == 4 and not set(child) & set(parent)
