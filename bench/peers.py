"""The gateways users would pick instead, run beside ours in the benchmark: LiteLLM's proxy and Portkey's gateway.

Both are installed at benchmark time into a cache folder outside the repository (never the project's .venv,
never a project dependency), once, and reused while the pinned version matches:

    ~/.cache/gateway-bench/litellm-<version>   a venv with litellm[proxy]==<version>   (pip)
    ~/.cache/gateway-bench/portkey-<version>   node_modules/@portkey-ai/gateway@<version> (npm)

GATEWAY_BENCH_CACHE moves that folder. Each peer runs as its own process (tree) on 127.0.0.1, pointed at the
bench's fake upstream, and is stopped by the harness at the end like everything else the bench starts. Its CPU
is the utime + stime of every process of its tree, read from /proc like the gateway's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import harness
from harness import BenchError, start

# A release whose [proxy] extra installs from the package registry this bench uses: 1.110.x requires a
# `litellm-proxy` distribution it does not serve; 1.108.10 to 1.109.3 (the ones tried) pin litellm-enterprise or
# litellm-proxy-extras .post releases it does not serve either. 1.106.12 also predates 1.107.0, the compromised one.
LITELLM_VERSION = "1.106.12"
PORTKEY_VERSION = "1.15.2"
CACHE = Path(os.environ.get("GATEWAY_BENCH_CACHE") or Path.home() / ".cache" / "gateway-bench")
MARKER = ".bench-installed"
LITELLM_MASTER_KEY = "sk-bench-litellm-master"

# Portkey's node server listens on every interface and has no flag for the address; this preload makes every
# listen() without an explicit host bind 127.0.0.1 only.
_BIND_LOCAL = """const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const a = args[0];
  if (typeof a === 'number' || (typeof a === 'string' && /^\\d+$/.test(a))) {
    if (typeof args[1] !== 'string') args.splice(1, 0, '127.0.0.1');
  } else if (a && typeof a === 'object' && a.path === undefined && !a.host) {
    args[0] = { ...a, host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
"""


def _run(cmd: list[str], log: Path, what: str, timeout: float, env: dict | None = None,
         cwd: Path | None = None) -> None:
    with open(log, "ab") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=cwd)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{what} took longer than {timeout:.0f} s; log {log}") from exc
    if proc.returncode != 0:
        tail = "\n".join(ln for ln in harness.log_tail(log, 60).splitlines() if "is ignored: it is neither" not in ln)
        raise BenchError(f"{what} failed (exit {proc.returncode}); log {log}:\n{tail[-3000:]}")


_failed: dict[str, BenchError] = {}  # an install that failed once in this run is not tried again for the next peer


def install_litellm(version: str = LITELLM_VERSION) -> Path:
    """A venv with litellm[proxy]==version under the cache folder; reused when its marker says it is complete."""
    venv = CACHE / f"litellm-{version}"
    if (venv / MARKER).exists() and (venv / "bin" / "litellm").exists():
        return venv
    if venv.name in _failed:
        raise _failed[venv.name]
    try:
        return _install_litellm(venv, version)
    except BenchError as exc:
        _failed[venv.name] = exc
        raise


def _install_litellm(venv: Path, version: str) -> Path:
    shutil.rmtree(venv, ignore_errors=True)  # a half-done install from an interrupted run
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = CACHE / f"litellm-{version}.install.log"
    log.unlink(missing_ok=True)
    print(f"bench: installing litellm[proxy]=={version} into {venv} (once; a few minutes)", flush=True)
    # The venv's scripts carry its absolute path, so it is built in place and marked complete at the end.
    _run([sys.executable, "-m", "venv", str(venv)], log, "creating the LiteLLM venv", 300)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
          f"litellm[proxy]=={version}"], log, f"pip install litellm[proxy]=={version}", 1800)
    (venv / MARKER).write_text(version + "\n")
    return venv


def install_portkey(version: str = PORTKEY_VERSION) -> Path:
    """@portkey-ai/gateway@version installed with npm under the cache folder; its start-server.js path."""
    home = CACHE / f"portkey-{version}"
    entry = home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if entry.exists():
        return entry
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        raise BenchError("Portkey needs node and npm (apt-get install -y nodejs npm)")
    tmp = CACHE / f"portkey-{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "package.json").write_text(json.dumps({"name": "gateway-bench-portkey", "private": True}) + "\n")
    log = CACHE / f"portkey-{version}.install.log"
    log.unlink(missing_ok=True)
    print(f"bench: installing @portkey-ai/gateway@{version} into {home} (once)", flush=True)
    _run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", f"@portkey-ai/gateway@{version}"], log,
         f"npm install @portkey-ai/gateway@{version}", 900, cwd=tmp)
    tmp.rename(home)  # node_modules does not mind being moved; a crash before this leaves only the .tmp folder
    return entry


def tree_pids(root: int) -> list[int]:
    """root and all its descendants, from /proc/<pid>/task/*/children."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
    return sorted(set(out))


class Peer:
    """One peer gateway started by the bench: its port, how to call it, and its process tree."""

    name = ""
    version = ""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = Path()
        self.key = ""  # the bearer token a client sends

    def extra_headers(self) -> dict[str, str]:
        """Headers a client sends on every request besides Authorization."""
        return {}

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            harness.stop(self.proc, harness.signal.SIGTERM, timeout=20)


class LiteLLM(Peer):
    """LiteLLM's proxy (uvicorn) with one model routed to the fake upstream, a master key, no database."""

    name = "litellm"
    version = LITELLM_VERSION

    def __init__(self, tmp: Path, upstream_url: str, upstream_key: str, model: str, workers: int) -> None:
        super().__init__()
        venv = install_litellm()
        self.workers, self.key = workers, LITELLM_MASTER_KEY
        d = tmp / f"litellm-w{workers}"
        d.mkdir()
        config = d / "config.yaml"
        # JSON is YAML; the upstream key reaches LiteLLM through the environment, not the file.
        config.write_text(json.dumps({
            "model_list": [{"model_name": model, "litellm_params": {
                "model": f"openai/{model}", "api_base": upstream_url, "api_key": "os.environ/BENCH_UPSTREAM_KEY"}}],
            "general_settings": {"master_key": LITELLM_MASTER_KEY},
            "litellm_settings": {"telemetry": False, "drop_params": True},
        }, indent=2) + "\n")
        self.port = harness.free_port()
        self.log = d / "litellm.log"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL")}
        env.update({
            "BENCH_UPSTREAM_KEY": upstream_key,
            "LITELLM_TELEMETRY": "False",
            # Use the cost map inside the package instead of downloading it at start-up.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
            "PYTHONUNBUFFERED": "1",
        })
        # Its own folder as the working directory: LiteLLM reads a .env from there, and the repo's is not for it.
        self.proc = start([str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                           "--port", str(self.port), "--num_workers", str(workers)], self.log, env, cwd=d)
        harness.wait_ready(self.proc, self.port, "/health/liveliness", self.log, f"LiteLLM ({workers} workers)",
                           timeout=180)


class Portkey(Peer):
    """Portkey's open-source gateway (node, one process), routed by its x-portkey-* headers to the fake."""

    name = "portkey"
    version = PORTKEY_VERSION

    def __init__(self, tmp: Path, upstream_url: str, upstream_key: str) -> None:
        super().__init__()
        entry = install_portkey()
        d = tmp / "portkey"
        d.mkdir()
        (d / "bind-local.cjs").write_text(_BIND_LOCAL)
        # Portkey passes the client's Authorization on to the upstream: the client holds the upstream key.
        self.upstream_url, self.key = upstream_url, upstream_key
        self.port = harness.free_port()
        self.log = d / "portkey.log"
        env = {**os.environ, "NODE_ENV": "production"}
        self.proc = start(["node", "-r", str(d / "bind-local.cjs"), str(entry), f"--port={self.port}", "--headless"],
                          self.log, env, cwd=d)
        harness.wait_ready(self.proc, self.port, "/", self.log, "Portkey's gateway", timeout=60)

    def extra_headers(self) -> dict[str, str]:
        return {"x-portkey-provider": "openai", "x-portkey-custom-host": self.upstream_url}


def node_version() -> str | None:
    node = shutil.which("node")
    if not node:
        return None
    return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
