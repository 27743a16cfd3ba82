"""The Redis counter against a real redis-server on 127.0.0.1: its counts, a server that lost its scripts or
restarted, and one that is down or never answers (a 503, not a hang)."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

import ratelimit
from errors import GatewayError
from tests.redis_server import RedisServer

LIMITS = [(5, ratelimit.MINUTE), (100, ratelimit.DAY)]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()


def counts(windows: list[ratelimit.Window]) -> list[int]:
    return [w.count for w in windows]


def test_counts_both_windows_in_one_step(server: RedisServer) -> None:
    import redis

    counter = ratelimit.RedisCounter(server.url)
    assert [counts(counter.hit("key:1", LIMITS)) for _ in range(3)] == [[1, 1], [2, 2], [3, 3]]
    windows = counter.hit("key:1", LIMITS)
    now = time.time()
    assert [w.amount for w in windows] == [5, 100]
    assert now < windows[0].reset <= now + 60 and now + 86000 < windows[1].reset <= now + 86400
    assert counts(counter.hit("key:2", LIMITS)) == [1, 1]  # keys apart
    store = redis.Redis.from_url(server.url)
    assert int(store.get("gateway:fixed:key:1:5:60")) == 4
    assert 0 < store.pttl("gateway:fixed:key:1:100:86400") <= 86_400_000


def test_a_server_that_lost_its_scripts_gets_it_again(server: RedisServer) -> None:
    import redis

    counter = ratelimit.RedisCounter(server.url)
    assert counts(counter.hit("key:1", LIMITS)) == [1, 1]
    redis.Redis.from_url(server.url).script_flush()
    assert counts(counter.hit("key:1", LIMITS)) == [2, 2]


def test_a_restarted_server_is_reconnected_to(server: RedisServer) -> None:
    counter = ratelimit.RedisCounter(server.url)
    assert counts(counter.hit("key:1", LIMITS)) == [1, 1]
    server.stop()
    server.start()  # same port; its counts and scripts are gone
    assert counts(counter.hit("key:1", LIMITS)) == [1, 1]
    assert counts(counter.hit("key:1", LIMITS)) == [2, 2]


def test_a_server_that_is_down_is_a_503(server: RedisServer) -> None:
    counter = ratelimit.RedisCounter(server.url)
    counter.hit("key:1", LIMITS)
    server.stop()
    for _ in range(2):
        with pytest.raises(GatewayError) as caught:
            counter.hit("key:1", LIMITS)
        assert (caught.value.status, caught.value.code) == (503, "rate_limit_store_unavailable")


def test_a_server_that_never_answers_is_a_503_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(silent.accept()[0])  # read nothing, answer nothing
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setattr(ratelimit, "STORE_TIMEOUT_SECONDS", 0.3)
    counter = ratelimit.RedisCounter(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
    started = time.monotonic()
    try:
        with pytest.raises(GatewayError) as caught:
            counter.hit("key:1", LIMITS)
        assert caught.value.status == 503
        assert time.monotonic() - started < 3
    finally:
        silent.close()
        for conn in held:
            conn.close()
