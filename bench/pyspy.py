"""Optional sampling profiles of the gateway worker (--profile): py-spy during extra, unmeasured load runs.

py-spy is not a dependency: `.venv/bin/pip install py-spy` to use this. Writes the collapsed stacks and a summary
(the functions and modules where the worker's samples fall, inclusive and self) to bench/results/.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import harness


def _pyspy() -> str | None:
    return shutil.which("py-spy") or (str(Path(sys.executable).with_name("py-spy"))
                                      if Path(sys.executable).with_name("py-spy").exists() else None)


def _frame_name(frame: str) -> str:
    """'handle (chat.py:130)' -> 'chat.py:handle'; site-packages paths shortened to the package."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python3" in path:
        path = "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"{path}:{name}"


def summarize(raw: Path, top: int = 25) -> dict:
    """Inclusive and self shares by function, and inclusive shares by package/module."""
    inclusive, self_, modules = Counter(), Counter(), Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";") if f]
        for name in set(frames):
            inclusive[name] += n
        for mod in {f.split(":", 1)[0].split("/", 1)[0] for f in frames}:
            modules[mod] += n
        if frames:
            self_[frames[-1]] += n
    share = (lambda c: [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "inclusive_pct": share(inclusive), "self_pct": share(self_),
            "modules_inclusive_pct": share(modules)}


def _record(pyspy: str, pid: int, seconds: float, raw: Path) -> subprocess.Popen:
    return subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                             "--format", "raw", "--output", str(raw), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def run(bench, gw, key: str, plain: str, stream: str) -> dict:
    """Profile a non-streamed run (16 connections) and a streamed run (50 streams); results are not counted."""
    pyspy = _pyspy()
    if not pyspy:
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    out_dir = Path(bench.args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    seconds = max(3, bench.args.duration)
    for name in ("plain", "stream"):
        kind = name
        raw = out_dir / f"profile-{name}.txt"
        spy = _record(pyspy, gw.pids[0], seconds + 1, raw)
        try:
            if kind == "plain" and bench.wrk:
                harness.run_wrk(bench.wrk, bench.tmp, gw.port, key, plain, 16, seconds)
            else:
                body, conns = (plain, 16) if kind == "plain" else (stream, 50)
                harness.run_load(bench.tmp, harness.load_cmd(kind, gw.port, key, body, conns, duration=seconds),
                                 seconds + 60)
            _, err = spy.communicate(timeout=seconds + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        if spy.returncode != 0 or not raw.exists():
            result[name] = {"error": f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"}
            continue
        summary = summarize(raw)
        result[name] = summary
        text = [f"py-spy profile of the gateway worker, {name} load ({summary['samples']} samples)", "",
                "modules (inclusive %):"] + [f"  {p:5.1f}  {k}" for k, p in summary["modules_inclusive_pct"]]
        text += ["", "functions (inclusive %):"] + [f"  {p:5.1f}  {k}" for k, p in summary["inclusive_pct"]]
        text += ["", "functions (self %):"] + [f"  {p:5.1f}  {k}" for k, p in summary["self_pct"]]
        (out_dir / f"profile-{name}-summary.txt").write_text("\n".join(text) + "\n")
        print("\n".join(text[:14]), flush=True)
    return result
