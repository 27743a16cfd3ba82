"""The benchmark's plumbing: processes it starts (and always stops), readiness, /proc counters, wrk and load runs.

Every process is started in its own session (process group) and registered; stop_all() runs from run.py's
finally, from atexit, and on SIGTERM/SIGINT, and kills each group it started by its id, nothing else.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
_started: list[subprocess.Popen] = []


class BenchError(RuntimeError):
    """Something the benchmark needs did not start or did not answer; the message says what and where."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, stdout=None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start a process in its own process group, logging to log_path (stdout may be a pipe instead)."""
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env or os.environ.copy(), stdout=stdout or log,
                            stderr=log, start_new_session=True)
    log.close()
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop one started process group: sig, then SIGKILL after timeout."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
    if proc in _started:
        _started.remove(proc)


def stop_all() -> None:
    for proc in reversed(list(_started)):
        try:
            stop(proc, signal.SIGINT, timeout=10)
        except Exception as exc:  # keep stopping the others
            print(f"bench: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def _on_signal(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup() -> None:
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def request(method: str, port: int, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 5) -> tuple[int, bytes, float]:
    """One request on a new connection: (status, body, seconds)."""
    t0 = time.perf_counter()
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.perf_counter() - t0
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, path: str, log_path: Path, what: str, timeout: float = 30) -> None:
    """Poll GET path until 200, or fail with the process's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} at start-up; log {log_path}:\n"
                             f"{log_tail(log_path)}")
        try:
            if request("GET", port, path, timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer GET {path} on port {port} within {timeout:.0f} s; "
                     f"log {log_path}:\n{log_tail(log_path)}")


def children(pid: int, want: int, timeout: float = 20) -> list[int]:
    """The pids of a process's children (gunicorn's workers), waiting until there are `want` of them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            kids = []
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(stat.parent.name))
                except (OSError, ValueError, IndexError):
                    continue
        if len(kids) >= want or time.monotonic() > deadline:
            if len(kids) < want:
                raise BenchError(f"pid {pid} has {len(kids)} worker(s), expected {want}")
            return sorted(kids)
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat.

    A process that exited during a step (a peer's worker restarted) makes the step's CPU unknowable: BenchError,
    which fails that step (a peer is then reported with the error) instead of the whole run."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        raise BenchError(f"process {pid} exited during the step; its CPU cannot be measured") from None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def system_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class Meter:
    """CPU seconds of a set of processes and of the whole machine over a window."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.t0 = time.perf_counter()
        self.cpu0 = {name: sum(cpu_seconds(p) for p in ps) for name, ps in pids.items()}
        self.sys0 = system_busy()

    def done(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy, total = system_busy()
        out = {"wall_s": wall, "machine_busy": (busy - self.sys0[0]) / max(1, total - self.sys0[1])}
        for name, ps in self.pids.items():
            out[f"{name}_cpu_s"] = sum(cpu_seconds(p) for p in ps) - self.cpu0[name]
        return out


def ensure_wrk(install: bool) -> str | None:
    """wrk's path; installs the Debian package when missing and allowed (root), else None."""
    path = shutil.which("wrk")
    if path or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return path
    print("bench: wrk is missing; installing the Debian package (apt-get install -y wrk)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"bench: could not install wrk ({exc}); using the gevent client", flush=True)
            return None
    return shutil.which("wrk")


_WRK_LUA = """wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
%(extra)sdone = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%%d,"duration_us":%%d,"errors_connect":%%d,"errors_read":%%d,' ..
    '"errors_write":%%d,"errors_status":%%d,"errors_timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"mean_us":%%.1f}\\n', summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def run_wrk(wrk: str, tmp: Path, port: int, key: str, body: str, conns: int, duration: float,
            headers: dict[str, str] | None = None) -> dict:
    """Closed-loop keep-alive POSTs with wrk (one thread): requests/s and latency percentiles in ms."""
    script = tmp / f"post-{port}.lua"
    extra = "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in (headers or {}).items())
    script.write_text(_WRK_LUA % {"body": body, "key": key, "extra": extra})
    cmd = [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script),
           f"http://127.0.0.1:{port}/v1/chat/completions"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    raw = json.loads(line[len("BENCHJSON "):])
    errors = {k[7:]: v for k, v in raw.items() if k.startswith("errors_") and v}
    return {"tool": "wrk", "requests": raw["requests"], "rps": raw["requests"] / (raw["duration_us"] / 1e6),
            "latency": {"p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
                        "max_ms": raw["max_us"] / 1000, "mean_ms": raw["mean_us"] / 1000},
            "errors": errors, "loadgen_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def load_cmd(mode: str, port: int, key: str, body: str, conns: int, headers: dict[str, str] | None = None,
             **opts) -> list[str]:
    cmd = [PY, str(BENCH / "load.py"), mode, "--port", str(port), "--key", key, "--body", body,
           "--concurrency", str(conns)]
    for name, value in (headers or {}).items():
        cmd += ["--header", f"{name}: {value}"]
    for name, value in opts.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def run_load(tmp: Path, cmd: list[str], timeout: float, on_event=None) -> dict:
    """Run bench/load.py; on_event(doc) sees each progress line; returns its result line (or raises)."""
    log = tmp / "load.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = start(cmd, log, stdout=subprocess.PIPE)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put(None)], daemon=True).start()
    deadline = time.monotonic() + timeout
    result = None
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # not one of load.py's JSON lines
            if doc.get("ev") == "result":
                result = doc
            elif on_event:
                on_event(doc)
        if result is None:
            raise BenchError(f"the load generator gave no result within {timeout:.0f} s; log {log}:\n{log_tail(log)}")
    finally:
        stop(proc, signal.SIGTERM, timeout=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["loadgen_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


class Sampler(threading.Thread):
    """Samples GET /health latency (a new connection each time) and the workers' RSS until stopped (bounded)."""

    def __init__(self, port: int, pids: list[int], interval: float = 0.05, max_seconds: float = 600) -> None:
        super().__init__(daemon=True)
        self.port, self.pids, self.interval, self.max_seconds = port, pids, interval, max_seconds
        self.health: list[tuple[float, float | None]] = []  # (wall time, seconds or None on failure)
        self.rss: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self.halt.is_set() and time.monotonic() < end:
            now = time.time()
            try:
                status, _, took = request("GET", self.port, "/health", timeout=5)
                self.health.append((now, took if status == 200 else None))
            except OSError:
                self.health.append((now, None))
            try:
                self.rss.append((time.time(), sum(rss_bytes(p) for p in self.pids)))
            except OSError:
                pass
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)

    def window(self, t0: float, t1: float) -> dict:
        lat = [v for t, v in self.health if t0 <= t <= t1 and v is not None]
        failed = sum(1 for t, v in self.health if t0 <= t <= t1 and v is None)
        rss = [v for t, v in self.rss if t0 <= t <= t1]
        lat.sort()
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: None)
        return {"health_n": len(lat), "health_failed": failed, "health_p50_ms": pick(0.5),
                "health_p99_ms": pick(0.99), "health_max_ms": lat[-1] * 1000 if lat else None,
                "rss_max": max(rss) if rss else None}
