"""A redis-server of the test's own on a free 127.0.0.1 port, for the tests of Redis-backed limits."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from tests.conftest import free_port


class RedisServer:
    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if not self.binary:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not on the PATH, but CI is set and .ci/run should have installed it")
            pytest.skip("redis-server not on the PATH (apt-get install redis-server); CI runs this test")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
