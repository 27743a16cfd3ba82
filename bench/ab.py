"""Interleaved A/B of gateway code trees on this machine: the bench's fake upstream and wrk, one gateway at a time.

    .venv/bin/python bench/ab.py TREE_A TREE_B [--rounds 3] [--duration 4] [--conns 1,16] [--workers 2]
                                 [--redis redis://127.0.0.1:6379/0] [--limits]

A tree is a directory holding the gateway's code (for example `git archive HEAD~1 | tar -x -C /tmp/a`). Each
round starts every tree's gateway in turn against the same fake upstream, warms it, and runs wrk at each
connection count; the medians over rounds are printed last. On a shared machine, compare trees only within one
run: interleaving puts both sides in the same minutes. CPU is the workers' utime + stime per request.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

import harness
from harness import BenchError, Meter, start, stop

sys.path.insert(0, str(harness.ROOT))
import billing  # noqa: E402
import db  # noqa: E402
import keys  # noqa: E402

PLAIN = json.dumps({"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "Say hello in 5 words."}]})
UPSTREAM_KEY = "sk-ab-upstream"


def run_tree(tree: Path, tmp: Path, up_port: int, args: argparse.Namespace, wrk: str) -> dict[int, dict]:
    work = Path(tempfile.mkdtemp(dir=tmp))
    text = (tree / "config.toml").read_text()
    text = re.sub(r'(?m)^base_url = "https://api\.openai\.com/v1"', f'base_url = "http://127.0.0.1:{up_port}/v1"',
                  text, count=1)
    if args.redis:
        text = re.sub(r"(?m)^storage_uri = .*$", f'storage_uri = "{args.redis}"', text)
        text = re.sub(r"(?m)^strategy = .*$", f'strategy = "{args.strategy}"', text)
    (work / "config.toml").write_text(text)
    db_path = str(work / "data" / "gateway.db")
    db.init(db_path)
    port = harness.free_port()
    env = {**os.environ, "GATEWAY_CONFIG": str(work / "config.toml"), "PORT": str(port),
           "WORKERS": str(args.workers), "OPENAI_API_KEY": UPSTREAM_KEY}
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    proc = start([gunicorn, "-c", "gunicorn.conf.py", "app:create_app()"], work / "gunicorn.log", env, cwd=tree)
    out: dict[int, dict] = {}
    try:
        harness.wait_ready(proc, port, "/health", work / "gunicorn.log", f"the gateway of {tree}")
        pids = harness.children(proc.pid, args.workers)
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=10)
        limits = (10**9, 10**9) if args.limits or args.redis else (0, 0)
        key = keys.create(conn, "ab", billing.parse_credits("1000000"), *limits)[1]
        conn.close()
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for _ in range(30):
            status, body, _ = harness.request("POST", port, "/v1/chat/completions", PLAIN.encode(), auth, timeout=10)
            if status != 200:
                raise BenchError(f"{tree}: warm-up answered {status}: {body[:300]!r}")
        for conns in args.conns:
            meter = Meter({"gateway": pids})
            res = harness.run_wrk(wrk, tmp, port, key, PLAIN, conns, args.duration)
            res.update(meter.done())
            res["cpu_ms"] = res["gateway_cpu_s"] / max(1, res["requests"]) * 1000
            out[conns] = res
            print(f"{tree.name:12s} c{conns:<3d} {res['rps']:7.0f} req/s  p50 {res['latency']['p50_ms']:.2f}  "
                  f"p99 {res['latency']['p99_ms']:.2f} ms  CPU {res['cpu_ms']:.3f} ms/request  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        stop(proc, signal.SIGINT, timeout=20)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--conns", default="1,16")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis", default="", help="storage_uri of a running Redis (the key gets limits)")
    parser.add_argument("--strategy", default="fixed-window")
    parser.add_argument("--limits", action="store_true", help="a key with limits that never bind")
    args = parser.parse_args()
    args.conns = [int(c) for c in args.conns.split(",") if c]
    wrk = harness.ensure_wrk(False)
    if not wrk:
        print("bench/ab.py: wrk is not installed", file=sys.stderr)
        return 1
    harness.install_cleanup()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-ab-"))
    up_port = harness.free_port()
    upstream = start([sys.executable, str(harness.BENCH / "fake_upstream.py"), "--port", str(up_port),
                      "--key", UPSTREAM_KEY], tmp / "upstream.log")
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        harness.wait_ready(upstream, up_port, "/health", tmp / "upstream.log", "the fake upstream")
        for _ in range(args.rounds):
            for tree in args.trees:
                for conns, res in run_tree(tree.resolve(), tmp, up_port, args, wrk).items():
                    results.setdefault((str(tree), conns), []).append(res)
    except BenchError as exc:
        print(f"bench/ab.py: {exc}", file=sys.stderr)
        return 1
    finally:
        harness.stop_all()
    for (tree, conns), runs in results.items():
        med = statistics.median
        print(f"median {Path(tree).name:12s} c{conns:<3d} {med(r['rps'] for r in runs):7.0f} req/s  "
              f"p50 {med(r['latency']['p50_ms'] for r in runs):.2f}  "
              f"p99 {med(r['latency']['p99_ms'] for r in runs):.2f} ms  "
              f"CPU {med(r['cpu_ms'] for r in runs):.3f} ms/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
