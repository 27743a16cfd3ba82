"""Per-key rate limits across gunicorn workers: Redis keeps them exact (the single-process limits are in
tests/inproc/test_limits.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import free_port


@pytest.fixture
def redis_url():
    server = shutil.which("redis-server")
    if not server:
        # CI installs it (.ci/run), so there its absence is a broken CI, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on the PATH, but CI is set and .ci/run should have installed it")
        pytest.skip("redis-server not on the PATH (apt-get install redis-server); CI runs this test")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import socket
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_limits_are_exact_across_workers(make_gateway, redis_url):
    def change(cfg):
        cfg["limits"]["storage_uri"] = redis_url
        cfg["limits"]["strategy"] = "moving-window"
    gw = make_gateway(change, workers=2)
    _, secret = gw.create_key("1", rpm=10)

    def one(_):  # a new connection each time, so both workers serve requests
        with requests.Session() as s:
            return s.get(f"{gw.base_url}/models", headers={"Authorization": f"Bearer {secret}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(40)))
    assert statuses.count(200) == 10
    assert statuses.count(429) == 30
