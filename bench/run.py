"""The gateway's benchmark: a fake upstream, the gateway as users run it, and load from a separate process.

    .venv/bin/python bench/run.py [--quick] [--peers | --peers-only]

--peers adds LiteLLM's proxy and Portkey's gateway (bench/peers.py: pinned, installed once into
~/.cache/gateway-bench, never into the project's .venv) to the same run: plain requests at 1 and 16 connections
to the fake upstream directly, the gateway (one worker), Portkey and LiteLLM (1 and 2 workers), and a side-by-side
table with ratios gateway / peer on stdout, in results.json and in bench/results/peers.md. --peers-only runs just
that (and writes peers.json instead of results.json).

Everything listens on 127.0.0.1; every load step is bounded in time and count; every process started here is
stopped at the end. Results: a table on stdout, bench/results/results.json, latency.png and latency.svg. The load
generator is wrk when installed (apt-installed when missing and allowed), else bench/load.py; the conditions line
and results.json say which.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from importlib import metadata
from pathlib import Path

import harness
import peers
import pyspy
import report
from harness import ROOT, BenchError, Meter, request, rss_bytes, start, stop

sys.path.insert(0, str(ROOT))
import billing  # noqa: E402
import db  # noqa: E402
import keys  # noqa: E402

MODEL = "gpt-4.1-mini"
UPSTREAM_KEY = "sk-bench-upstream"
# bench/floor_app.py's modes, run after the gateway in the peers step: the stack's cost before any gateway work.
FLOORS = {"stack": "floor: gunicorn + Flask alone (the gateway's app, answered by a first hook)",
          "upstream": "floor: the same + one upstream call (providers/http)"}
PLAIN = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello in 5 words."}]})
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def stream_body(knobs: str) -> str:
    return json.dumps({"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": f"Stream a short greeting. [bench {knobs}]"}]})


class Gateway:
    """One gunicorn + gevent gateway on a free port, with its own config copy and database in a temp dir."""

    def __init__(self, bench: Bench, name: str, workers: int = 1, limits: tuple[str, str] | None = None,
                 stall_monitor: bool = False, floor: str = "") -> None:
        self.dir = bench.tmp / name
        self.dir.mkdir()
        text = (ROOT / "config.toml").read_text()
        text, n = re.subn(r'(?m)^base_url = "https://api\.openai\.com/v1"', f'base_url = "{bench.upstream_url}"', text)
        if limits:
            text = re.sub(r'(?m)^storage_uri = .*$', f'storage_uri = "{limits[0]}"', text)
            text = re.sub(r'(?m)^strategy = .*$', f'strategy = "{limits[1]}"', text)
        self.config = self.dir / "config.toml"
        self.config.write_text(text)
        parsed = tomllib.loads(text)
        if n != 1 or parsed["upstreams"]["openai"]["base_url"] != bench.upstream_url or \
                parsed["models"][MODEL]["upstream"] != "openai":
            raise BenchError("config.toml changed shape: could not point [upstreams.openai].base_url at the fake "
                             f"upstream for model {MODEL}; update bench/run.py")
        self.db_path = str(self.dir / parsed["server"].get("database", "gateway.db"))
        db.init(self.db_path)
        self.workers, self.port = workers, harness.free_port()
        self.log = self.dir / "gunicorn.log"
        self.stall_file = self.dir / "stall"
        env = {**os.environ, "GATEWAY_CONFIG": str(self.config), "PORT": str(self.port), "WORKERS": str(workers),
               "OPENAI_API_KEY": UPSTREAM_KEY}
        env.pop("HOST", None)
        conf = "gunicorn.conf.py"
        if stall_monitor:
            env["BENCH_STALL_FILE"] = str(self.stall_file)
            conf = str(harness.BENCH / "gunicorn_stall.py")
        app = ["app:create_app()"]
        if floor:  # bench/floor_app.py: the same app and settings, answered by a first hook of the bench's
            env["BENCH_FLOOR"] = floor
            app = [f"--pythonpath={harness.BENCH}", "floor_app:create_app()"]
        self.proc = start([GUNICORN, "-c", conf, *app], self.log, env)
        harness.wait_ready(self.proc, self.port, "/health", self.log, "the gateway (gunicorn)")
        self.pids = harness.children(self.proc.pid, workers)

    def key(self, rpm: int = 0, rpd: int = 0, credits: str = "1000000") -> str:
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=10)
        try:
            return keys.create(conn, "bench", billing.parse_credits(credits), rpm, rpd)[1]
        finally:
            conn.close()

    def usage_rows(self, after_id: int = 0) -> tuple[int, int]:
        """(rows with status 200 after after_id, the last row id)."""
        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            n = conn.execute("SELECT COUNT(*) FROM usage WHERE status = 200 AND id > ?", (after_id,)).fetchone()[0]
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM usage").fetchone()[0]
            return n, last
        finally:
            conn.close()

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids)

    def fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{p}/fd")) for p in self.pids)

    def stalls(self, t0: float, t1: float) -> dict:
        """The stall monitors' worst loop lag, longest single greenlet run and longest garbage collection
        between two wall-clock times (wall ms, with the CPU ms the worker used in the same span)."""
        out = {"stall_max_ms": 0.0, "stalls_over_50ms": 0, "longest_run_ms": 0.0, "longest_run_cpu_ms": None,
               "longest_run_greenlet": None, "gc_max_ms": 0.0, "gc_max_cpu_ms": None, "gc_max_generation": None,
               "gcs_over_50ms_by_generation": {}}
        for path in self.dir.glob("stall.*.json"):
            doc = json.loads(path.read_text())
            for t, late in doc["lags"]:
                if t0 <= t <= t1:
                    out["stall_max_ms"] = max(out["stall_max_ms"], late * 1000)
                    out["stalls_over_50ms"] += late > 0.05
            for t, ran, name, used in doc["slices"]:
                if t0 <= t <= t1 and ran * 1000 > out["longest_run_ms"]:
                    out.update(longest_run_ms=ran * 1000, longest_run_cpu_ms=used * 1000, longest_run_greenlet=name)
            for t, took, gen, used in doc["gcs"]:
                if t0 <= t <= t1:
                    if took * 1000 > out["gc_max_ms"]:
                        out.update(gc_max_ms=took * 1000, gc_max_cpu_ms=used * 1000, gc_max_generation=gen)
                    if took > 0.05:
                        by_gen = out["gcs_over_50ms_by_generation"]
                        by_gen[str(gen)] = by_gen.get(str(gen), 0) + 1
        return out

    def stop(self) -> None:
        stop(self.proc, signal.SIGINT, timeout=40)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        self.results: dict = {"runs": {}}
        self.wrk = None if args.loadgen == "gevent" else harness.ensure_wrk(not args.no_install)
        if args.loadgen == "wrk" and not self.wrk:
            raise BenchError("--loadgen wrk: wrk is not installed (apt-get install -y wrk)")
        self.up_port = harness.free_port()
        self.upstream_url = f"http://127.0.0.1:{self.up_port}/v1"
        log = self.tmp / "upstream.log"
        self.upstream = start([sys.executable, str(harness.BENCH / "fake_upstream.py"), "--port", str(self.up_port),
                               "--key", UPSTREAM_KEY, "--chunks", str(args.chunks)], log)
        harness.wait_ready(self.upstream, self.up_port, "/health", log, "the fake upstream")

    def conditions(self) -> dict:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
        versions = {p: metadata.version(p) for p in ("gunicorn", "gevent", "flask", "flask-limiter", "requests")}
        if self.args.peers:
            versions.update({"litellm": peers.LITELLM_VERSION, "@portkey-ai/gateway": peers.PORTKEY_VERSION,
                             "node": peers.node_version()})
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        wrk = None
        if self.wrk:
            out = subprocess.run([self.wrk, "--version"], capture_output=True, text=True, timeout=10)
            wrk = (out.stdout + out.stderr).split("Copyright")[0].strip()
        return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cores": os.cpu_count(),
                "cpu": cpu, "loadavg_at_start": os.getloadavg(), "kernel": platform.release(),
                "python": platform.python_version(), "versions": versions, "commit": commit,
                "load_generator": wrk or "bench/load.py (gevent raw sockets)", "quick": self.args.quick,
                "note": "fake upstream, gateway and load generator all run on this machine and share its cores"}

    def plain(self, name: str, port: int, key: str, conns: int, pids: dict[str, list[int]],
              headers: dict[str, str] | None = None) -> dict:
        """Non-streamed load; CPU per request is that of pids["gateway"] or, for a peer, pids["server"]."""
        meter = Meter(pids)
        if self.wrk:
            out = harness.run_wrk(self.wrk, self.tmp, port, key, PLAIN, conns, self.args.duration, headers)
        else:
            out = harness.run_load(self.tmp, harness.load_cmd("plain", port, key, PLAIN, conns, headers,
                                                              duration=self.args.duration), self.args.duration + 60)
        out.update(meter.done())
        out["conns"] = conns
        cpu = out.get("gateway_cpu_s", out.get("server_cpu_s"))
        if cpu is not None and out["requests"]:
            out["cpu_per_request_ms"] = cpu / out["requests"] * 1000
        self.results["runs"][name] = out
        print(report.progress(name, out), flush=True)
        return out

    def stream(self, name: str, port: int, key: str, n: int, pids: dict[str, list[int]], chunks: int = 0) -> dict:
        body = stream_body(f"chunks={chunks or self.args.chunks} delay={self.args.chunk_delay_ms / 1000}")
        meter = Meter(pids)
        cmd = harness.load_cmd("stream", port, key, body, n, duration=self.args.duration, stream_timeout=30)
        out = harness.run_load(self.tmp, cmd, self.args.duration + 90)
        out.update(meter.done())
        out["conns"] = n
        if "gateway_cpu_s" in out and out["events"]:
            out["cpu_per_chunk_ms"] = out["gateway_cpu_s"] / out["events"] * 1000
            out["cpu_per_stream_ms"] = out["gateway_cpu_s"] / max(1, out["streams"]) * 1000
        self.results["runs"][name] = out
        print(report.progress(name, out), flush=True)
        return out

    def warm(self, gw: Gateway, key: str) -> None:
        """A few requests of each kind, so imports, token tables and pools are loaded before measuring."""
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for _ in range(20):
            status, body, _ = request("POST", gw.port, "/v1/chat/completions", PLAIN.encode(), auth, timeout=10)
            if status != 200:
                raise BenchError(f"warm-up request answered {status}: {body[:300]!r}; log {gw.log}")
        for _ in range(3):
            status, body, _ = request("POST", gw.port, "/v1/chat/completions", stream_body("chunks=5").encode(),
                                      auth, timeout=10)
            if status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
                raise BenchError(f"warm-up stream answered {status}: {body[-300:]!r}; log {gw.log}")

    def run_main(self) -> None:
        """Idle memory, non-streamed load at 1/16/64 connections, the limiter's cost, streamed load."""
        gw = Gateway(self, "main")
        try:
            key = gw.key()
            time.sleep(1)
            idle = {"rss_after_start": gw.rss()}
            auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            status, body, _ = request("POST", gw.port, "/v1/chat/completions", PLAIN.encode(), auth, timeout=10)
            if status != 200:
                raise BenchError(f"the first request answered {status}: {body[:300]!r}; log {gw.log}")
            idle["rss_after_one_request"] = gw.rss()
            self.warm(gw, key)
            idle["rss_after_warmup"] = gw.rss()
            meter = Meter({"gateway": gw.pids})
            time.sleep(2)
            self.results["idle_cpu_pct"] = 100 * meter.done()["gateway_cpu_s"] / 2
            self.results["idle"] = idle
            print(report.progress("idle", idle), flush=True)
            up = [self.upstream.pid]
            for conns in self.args.conns:
                direct = self.plain(f"plain_direct_{conns}", self.up_port, UPSTREAM_KEY, conns, {"upstream": up})
                self.results["upstream_alone_rps"] = max(self.results.get("upstream_alone_rps", 0), direct["rps"])
                _, last = gw.usage_rows()
                out = self.plain(f"plain_gateway_{conns}", gw.port, key, conns, {"gateway": gw.pids, "upstream": up})
                out["usage_rows"] = gw.usage_rows(last)[0]
            limited = gw.key(rpm=10**9, rpd=10**9)
            self.plain("plain_gateway_16_limiter", gw.port, limited, 16, {"gateway": gw.pids, "upstream": up})
            for n in self.args.streams:
                self.stream(f"stream_direct_{n}", self.up_port, UPSTREAM_KEY, n, {"upstream": up})
                _, last = gw.usage_rows()
                out = self.stream(f"stream_gateway_{n}", gw.port, key, n, {"gateway": gw.pids, "upstream": up})
                out["usage_rows"] = gw.usage_rows(last)[0]
            # The same streams with 5 content events instead of 50 split the CPU into a per-stream part and a
            # per-event part: (CPU per stream, long - CPU per stream, short) / (events per stream, long - short).
            n = max(self.args.streams)
            long = self.results["runs"][f"stream_gateway_{n}"]
            _, last = gw.usage_rows()
            short = self.stream(f"stream_gateway_{n}_short", gw.port, key, n, {"gateway": gw.pids, "upstream": up},
                                chunks=5)
            short["usage_rows"] = gw.usage_rows(last)[0]
            if long["ok"] and short["ok"] and "cpu_per_stream_ms" in short:
                per_event = (long["cpu_per_stream_ms"] - short["cpu_per_stream_ms"]) / (
                    long["events"] / long["ok"] - short["events"] / short["ok"])
                long["marginal_cpu_per_chunk_ms"] = per_event
                long["fixed_cpu_per_stream_ms"] = short["cpu_per_stream_ms"] - per_event * short["events"] / short["ok"]
            if self.args.profile:
                self.results["profile"] = pyspy.run(self, gw, key, PLAIN, stream_body(
                    f"chunks={self.args.chunks} delay={self.args.chunk_delay_ms / 1000}"))
            self.results["idle"]["rss_after_runs"] = gw.rss()
        finally:
            gw.stop()

    def run_hold(self, n: int) -> None:
        """n slow streams held open at once in one worker: completion, memory per stream, /health, stalls."""
        gw = Gateway(self, f"hold{n}", stall_monitor=True)
        try:
            key = gw.key()
            self.warm(gw, key)
            time.sleep(1)
            before = {"rss": gw.rss(), "fds": gw.fds(), "usage_id": gw.usage_rows()[1]}
            sampler = harness.Sampler(gw.port, gw.pids, interval=0.05,
                                      max_seconds=self.args.open_timeout + self.args.hold_seconds + 120)
            marks: dict[str, float] = {"start": time.time()}
            all_open, finished = threading.Event(), threading.Event()

            def watch() -> None:
                """Once every stream is open (or the open time-out passed), hold them; then the upstream ends them."""
                all_open.wait(self.args.open_timeout)
                if not finished.is_set():
                    marks["held_from"] = time.time()
                    marks["upstream_held"] = json.loads(request("GET", self.up_port, "/control/stats")[1])["held_open"]
                    marks["fds"] = gw.fds()
                    finished.wait(self.args.hold_seconds)
                    marks["held_to"] = time.time()
                try:
                    request("POST", self.up_port, "/control/release")
                except OSError as exc:
                    print(f"bench: could not release the held streams: {exc}", file=sys.stderr)

            def on_event(doc: dict) -> None:
                if doc.get("ev") == "all_open":
                    all_open.set()
                elif doc.get("ev") == "progress":
                    print(f"  hold {n}: {doc['open']} open after {doc['t']:.1f} s", flush=True)

            sampler.start()
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            body = stream_body(f"hold=1 delay={self.args.hold_delay} jitter={self.args.hold_delay / 3:.2f}")
            cmd = harness.load_cmd("hold", gw.port, key, body, n, stream_timeout=self.args.open_timeout +
                                   self.args.hold_seconds + 60, open_concurrency=64, timeout=30)
            try:
                out = harness.run_load(self.tmp, cmd, self.args.open_timeout + self.args.hold_seconds + 120, on_event)
            finally:
                all_opened = all_open.is_set()
                finished.set()
                all_open.set()
                watcher.join(timeout=15)
                marks["end"] = time.time()
                sampler.stop()
            held = sampler.window(marks.get("held_from", marks["end"]), marks.get("held_to", marks["end"]))
            out.update({"n": n, "all_opened": all_opened, "rss_before": before["rss"],
                        "fds_before": before["fds"], "fds_held": marks.get("fds"),
                        "upstream_held": marks.get("upstream_held"), "held_window_s": marks.get("held_to", 0) -
                        marks.get("held_from", 0), "held": held,
                        "ramp": sampler.window(marks["start"], marks.get("held_from", marks["end"])),
                        "whole": sampler.window(marks["start"], marks["end"]),
                        "drain": sampler.window(marks.get("held_to", marks["end"]), marks["end"]),
                        "usage_rows": gw.usage_rows(before["usage_id"])[0],
                        "stall_held": gw.stalls(marks.get("held_from", 0), marks.get("held_to", 0)),
                        "stall_whole": gw.stalls(marks["start"], marks["end"])})
            if held["rss_max"]:
                out["kb_per_stream"] = (held["rss_max"] - before["rss"]) / n / 1024
            self.results["runs"][f"hold_{n}"] = out
            print(report.progress(f"hold_{n}", out), flush=True)
        finally:
            gw.stop()

    def run_peers(self) -> None:
        """Plain requests at 1 and 16 connections, in this one run, to the fake upstream directly, the gateway
        (one worker), Portkey's gateway and LiteLLM's proxy (1 and 2 workers). Server CPU is each server's whole
        process tree (the gateway's gunicorn arbiter included), so the figures compare like with like."""
        up = [self.upstream.pid]
        steps = (1, 16)
        self.results["peers"] = peers_out = {"servers": {}}
        for conns in steps:
            self.plain(f"peers_direct_{conns}", self.up_port, UPSTREAM_KEY, conns, {"upstream": up})
        gw = Gateway(self, "peers-gateway")
        try:
            key = gw.key()
            self.warm(gw, key)
            tree = [gw.proc.pid] + gw.pids
            peers_out["servers"]["gateway"] = {"label": "this gateway (gunicorn, 1 gevent worker)", "pids": len(tree)}
            for conns in steps:
                self.plain(f"peers_gateway_{conns}", gw.port, key, conns, {"server": tree, "upstream": up})
        finally:
            gw.stop()
        for floor, label in FLOORS.items():
            gw = Gateway(self, f"peers-floor-{floor}", floor=floor)
            try:
                self.check_relays(gw.port, {}, f"the {floor} floor", gw.log)
                tree = [gw.proc.pid] + gw.pids
                peers_out["servers"][f"floor_{floor}"] = {"label": label, "pids": len(tree)}
                for conns in steps:
                    self.plain(f"peers_floor_{floor}_{conns}", gw.port, "floor", conns,
                               {"server": tree, "upstream": up})
            finally:
                gw.stop()
        starts = [("portkey", f"Portkey {peers.PORTKEY_VERSION} (node, 1 process)",
                   lambda: peers.Portkey(self.tmp, self.upstream_url, UPSTREAM_KEY))]
        for w in self.args.litellm_workers:
            starts.append((f"litellm_w{w}", f"LiteLLM {peers.LITELLM_VERSION} ({w} worker{'s' if w > 1 else ''})",
                           lambda w=w: peers.LiteLLM(self.tmp, self.upstream_url, UPSTREAM_KEY, MODEL, w)))
        for name, label, make in starts:
            try:
                peer = make()
            except BenchError as exc:
                peers_out["servers"][name] = {"label": label, "error": str(exc)}
                print(f"bench: {label} skipped: {exc}", flush=True)
                continue
            try:
                self.warm_peer(peer)
                tree = peer.pids()
                peers_out["servers"][name] = {"label": label, "pids": len(tree)}
                for conns in steps:
                    out = self.plain(f"peers_{name}_{conns}", peer.port, peer.key, conns,
                                     {"server": tree, "upstream": up}, peer.extra_headers())
                    if peer.pids() != tree:
                        out["note"] = "the process tree changed during the step; CPU counts the tree at its start"
            except BenchError as exc:
                peers_out["servers"][name]["error"] = str(exc)
                print(f"bench: {label} failed: {exc}", flush=True)
            finally:
                peer.stop()

    def warm_peer(self, peer: peers.Peer) -> None:
        self.check_relays(peer.port, {"Authorization": f"Bearer {peer.key}", **peer.extra_headers()}, peer.name,
                          peer.log)

    @staticmethod
    def check_relays(port: int, headers: dict[str, str], what: str, log: Path) -> None:
        """Twenty requests, each checked to be the fake upstream's answer relayed, before measuring."""
        headers = {"Content-Type": "application/json", **headers}
        for _ in range(20):
            status, body, _ = request("POST", port, "/v1/chat/completions", PLAIN.encode(), headers, timeout=30)
            if status != 200 or b"Hello from the bench upstream!" not in body:
                raise BenchError(f"{what} answered {status}: {body[:300]!r}; log {log}")

    def run_redis(self) -> None:
        """WORKERS=2 with Redis-backed limits (a key with limits that never bind), 16 connections."""
        server = shutil.which("redis-server")
        if not server:
            self.results["redis"] = "skipped: redis-server is not installed (apt-get install redis-server)"
            print(f"bench: {self.results['redis']}", flush=True)
            return
        port = harness.free_port()
        log = self.tmp / "redis.log"
        redis = start([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], log)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or redis.poll() is not None:
                raise BenchError(f"redis-server did not start; log {log}:\n{harness.log_tail(log)}")
            time.sleep(0.1)
        try:
            for workers in (1, 2):
                gw = Gateway(self, f"redis{workers}", workers=workers,
                             limits=(f"redis://127.0.0.1:{port}/0", "fixed-window"))
                try:
                    key = gw.key(rpm=10**9, rpd=10**9)
                    self.warm(gw, key)
                    # Each worker's own CPU too: wrk opens its 16 keep-alive connections at once, and how the
                    # workers happen to split them bounds what two workers can do (workers_cpu_split).
                    out = self.plain(f"plain_gateway_16_redis_w{workers}", gw.port, key, 16,
                                     {"gateway": gw.pids, "upstream": [self.upstream.pid],
                                      **{f"worker{i}": [pid] for i, pid in enumerate(gw.pids)}})
                    split = [out.pop(f"worker{i}_cpu_s") for i in range(len(gw.pids))]
                    out["workers_cpu_split"] = [c / max(sum(split), 1e-9) for c in split]
                finally:
                    gw.stop()
        finally:
            stop(redis, signal.SIGTERM)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The gateway's benchmark (see bench/run.py's docstring).")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 3 s steps, 200 held streams")
    parser.add_argument("--duration", type=float, help="seconds per load step (default 10; 3 with --quick)")
    parser.add_argument("--hold", help="held-stream counts, comma-separated (default 1000,5000; 200 with --quick)")
    parser.add_argument("--hold-seconds", type=float, help="how long all streams stay open (default 20; 5 quick)")
    parser.add_argument("--hold-delay", type=float, default=1.5, help="seconds between a held stream's events")
    parser.add_argument("--open-timeout", type=float, default=120, help="longest wait for all held streams to open")
    parser.add_argument("--chunks", type=int, default=50, help="content events per stream")
    parser.add_argument("--chunk-delay-ms", type=float, default=10, help="upstream delay between stream events")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "gevent"), default="auto")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install wrk when it is missing")
    parser.add_argument("--no-main", action="store_true", help="skip idle memory, plain and streamed runs")
    parser.add_argument("--no-hold", action="store_true")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also record py-spy profiles (extra runs)")
    parser.add_argument("--peers", action="store_true",
                        help="also run LiteLLM and Portkey (installed once into ~/.cache/gateway-bench) beside the "
                             "gateway: plain requests at 1 and 16 connections; writes results/peers.md")
    parser.add_argument("--peers-only", action="store_true",
                        help="--peers, and skip the gateway's other steps (writes peers.json, not results.json)")
    parser.add_argument("--litellm-workers", default="1,2", help="LiteLLM worker counts to run (default 1,2)")
    parser.add_argument("--out", default=str(harness.BENCH / "results"))
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, databases, logs)")
    args = parser.parse_args()
    args.duration = args.duration or (3 if args.quick else 10)
    args.hold_seconds = args.hold_seconds or (5 if args.quick else 20)
    args.hold = [int(x) for x in (args.hold or ("200" if args.quick else "1000,5000")).split(",") if x]
    args.litellm_workers = [int(x) for x in args.litellm_workers.split(",") if x]
    if args.peers_only:
        args.peers = args.no_main = args.no_hold = args.no_redis = True
    args.conns = [1, 16, 64]
    args.streams = [1, 50]
    return args


def main() -> int:
    args = parse_args()
    harness.install_cleanup()
    bench = None
    try:
        bench = Bench(args)
        bench.results["conditions"] = bench.conditions()
        bench.results["args"] = {k: v for k, v in vars(args).items()}
        print(report.conditions(bench.results["conditions"]), flush=True)
        if not args.no_main:
            bench.run_main()
        for n in [] if args.no_hold else args.hold:
            bench.run_hold(n)
        if not args.no_redis:
            bench.run_redis()
        if args.peers:
            bench.run_peers()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        bench.results["targets"] = report.targets(bench.results)
        # --peers-only leaves the full run's results.json in place and writes its own file beside it.
        json_path = out / ("peers.json" if args.peers_only else "results.json")
        written = [json_path]
        if args.peers:
            bench.results["peers"]["table"] = report.peers_rows(bench.results)
            md = report.peers_markdown(bench.results)
            (out / "peers.md").write_text(md + "\n")
            written.append(out / "peers.md")
        json_path.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
        if not args.peers_only:
            report.chart(bench.results, out)
            print(report.table(bench.results))
            written += [out / "latency.png", out / "latency.svg"]
        if args.peers:
            print("\n" + md)
        print("\nwritten: " + ", ".join(map(str, written)))
        return 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        harness.stop_all()
        if bench and not args.keep_tmp:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        elif bench:
            print(f"bench: temp dir kept: {bench.tmp}")


if __name__ == "__main__":
    sys.exit(main())
