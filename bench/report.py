"""The benchmark's output: progress lines, the markdown tables, the targets from issue 6, and the chart."""
from __future__ import annotations

from pathlib import Path

import chart as chart_mod

MB = 1024 * 1024


def _f(v, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def _lat(d: dict | None, key: str = "latency") -> str:
    lat = (d or {}).get(key) or {}
    return " / ".join(_f(lat.get(p), 2) for p in ("p50_ms", "p90_ms", "p99_ms"))


def _added(direct: dict | None, gateway: dict | None, key: str = "latency") -> str:
    if not direct or not gateway:
        return "-"
    a, b = direct.get(key) or {}, gateway.get(key) or {}
    return " / ".join(_f(b[p] - a[p], 2) if b.get(p) is not None and a.get(p) is not None else "-"
                      for p in ("p50_ms", "p90_ms", "p99_ms"))


def progress(name: str, out: dict) -> str:
    if name == "idle":
        return "idle: worker RSS " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in out.items())
    if name.startswith(("plain", "peers")):
        who = "server" if name.startswith("peers") else "gateway"
        cpu = f", {who} CPU {out['cpu_per_request_ms']:.3f} ms/request" if "cpu_per_request_ms" in out else ""
        errors = f", ERRORS {out['errors']}" if out.get("errors") else ""
        return (f"{name}: {out['rps']:,.0f} req/s, p50/p90/p99 {_lat(out)} ms{cpu}, "
                f"machine busy {out['machine_busy']:.0%}{errors}")
    if name.startswith("stream"):
        cpu = f", CPU {out['cpu_per_chunk_ms']:.3f} ms/chunk" if "cpu_per_chunk_ms" in out else ""
        return (f"{name}: {out['ok']}/{out['streams']} streams ok, TTFT p50/p90/p99 {_lat(out, 'ttft')} ms, "
                f"{out['events']} events{cpu}" + (f", ERRORS {out['errors']}" if out["errors"] else ""))
    if name.startswith("hold"):
        held = out["held"]
        return (f"{name}: {out['ok']}/{out['n']} completed, {_f(out.get('kb_per_stream'), 1)} KB/stream, "
                f"/health p50 {_f(held['health_p50_ms'])} max {_f(held['health_max_ms'])} ms while held, "
                f"longest loop stall {out['stall_whole']['stall_max_ms']:.1f} ms, longest greenlet run "
                f"{out['stall_whole']['longest_run_ms']:.1f} ms, longest GC {out['stall_whole']['gc_max_ms']:.1f} ms"
                + (f", ERRORS {out['errors']}" if out["errors"] else ""))
    return f"{name}: {out}"


def conditions(c: dict) -> str:
    return (f"bench: {c['date']}, {c['cores']} cores ({c['cpu']}), load average {c['loadavg_at_start'][0]:.2f}, "
            f"Python {c['python']}, gunicorn {c['versions']['gunicorn']}, gevent {c['versions']['gevent']}; "
            f"load generator: {c['load_generator']}; {c['note']}" + (" (--quick)" if c["quick"] else ""))


def targets(r: dict) -> list[dict]:
    """The issue's targets beside this run's numbers."""
    runs = r["runs"]
    out = []

    def add(what: str, goal: str, value, ok: bool | None, note: str = "") -> None:
        out.append({"target": what, "goal": goal, "measured": value, "met": ok, "note": note})

    g16, d1, g1 = runs.get("plain_gateway_16"), runs.get("plain_direct_1"), runs.get("plain_gateway_1")
    if g16:
        add("CPU per non-streamed request (16 conns)", "<= 1 ms", f"{g16['cpu_per_request_ms']:.2f} ms",
            g16["cpu_per_request_ms"] <= 1)
    if d1 and g1:
        added = g1["latency"]["p50_ms"] - d1["latency"]["p50_ms"]
        add("Added latency at 1 connection, p50", "<= 1.5 ms", f"{added:.2f} ms", added <= 1.5)
    if g16:
        add("Throughput at 16 connections, 1 worker", ">= 1,000 req/s", f"{g16['rps']:,.0f} req/s", g16["rps"] >= 1000)
    w2 = runs.get("plain_gateway_16_redis_w2")
    if w2 and g16:
        add("Throughput at 16 connections, 2 workers + Redis limits", "more than 1 worker",
            f"{w2['rps']:,.0f} req/s", w2["rps"] > g16["rps"])
    s1, sd1 = runs.get("stream_gateway_1"), runs.get("stream_direct_1")
    many = max((v for k, v in runs.items() if k.startswith("stream_gateway") and not k.endswith("_short")),
               key=lambda v: v["conns"], default=None)
    if many and "cpu_per_chunk_ms" in many:
        one = runs.get("stream_gateway_1", {}).get("cpu_per_chunk_ms")
        add(f"CPU per relayed chunk ({many['conns']} streams: worker CPU / events relayed)", "<= 0.1 ms",
            f"{many['cpu_per_chunk_ms']:.3f} ms (1 stream: {_f(one, 3)} ms; per event beyond the stream's fixed "
            f"cost: {_f(many.get('marginal_cpu_per_chunk_ms'), 3)} ms)", many["cpu_per_chunk_ms"] <= 0.1)
    if s1 and sd1 and s1["ttft"]["p50_ms"] is not None:
        added = s1["ttft"]["p50_ms"] - sd1["ttft"]["p50_ms"]
        add("Added time to first token at 1 stream, p50", "<= 2 ms", f"{added:.2f} ms", added <= 2)
    streams_ok = all(runs[k]["ok"] == runs[k]["streams"] and runs[k].get("usage_rows") == runs[k]["ok"]
                     and runs[k]["cost_seen"] == runs[k]["ok"] for k in runs if k.startswith("stream_gateway"))
    add("Every stream ends with [DONE] and its usage is charged", "all", "all" if streams_ok else "NOT all", streams_ok)
    holds = sorted((v for k, v in runs.items() if k.startswith("hold_")), key=lambda v: v["n"])
    if holds:
        h = holds[-1]
        n = h["n"]
        complete = h["ok"] == n and h["usage_rows"] == n and h["all_opened"]
        add(f"{n:,} concurrent streams in one worker all complete", "all (5,000)",
            f"{h['ok']:,}/{n:,} completed, {h['usage_rows']:,} charged", complete and n >= 5000,
            "" if n >= 5000 else "run with fewer streams than the target")
        kb = h.get("kb_per_stream")
        add(f"Memory per open stream ({n:,} streams)", "<= 60 KB", f"{_f(kb, 1)} KB", kb is not None and kb <= 60)
        hm = h["held"]["health_max_ms"]
        add(f"/health while {n:,} streams are open (max)", "< 50 ms",
            f"p50 {_f(h['held']['health_p50_ms'])} ms, max {_f(hm)} ms", hm is not None and hm < 50)
        w = h["stall_whole"]
        add(f"Longest event-loop stall during the {n:,}-stream run",
            "short (a blocking lock wait stalls the loop for its whole length: docs/runtime.md, SQLite)",
            f"loop lag {w['stall_max_ms']:.1f} ms (while held {h['stall_held']['stall_max_ms']:.1f} ms); longest "
            f"single greenlet run {w['longest_run_ms']:.1f} ms ({_f(w['longest_run_cpu_ms'], 1)} ms CPU); longest GC "
            f"{w['gc_max_ms']:.1f} ms (gen {w['gc_max_generation']}); /health max {_f(h['whole']['health_max_ms'])} ms",
            None, "inside the worker: bench/gunicorn_stall.py")
    idle = r.get("idle")
    if idle:
        mb = idle["rss_after_warmup"] / MB
        add("Idle memory of one worker (RSS after warm-up)", "<= 80 MB",
            f"{idle['rss_after_start'] / MB:.1f} MB at start, {mb:.1f} MB after warm-up", mb <= 80)
    return out


def table(r: dict) -> str:
    runs, lines = r["runs"], []
    c = r["conditions"]
    lines += ["", f"## Results ({c['date']}, {c['cores']} cores, {c['cpu']}; {c['note']})", "",
              "Non-streamed chat (closed loop, keep-alive; latency in ms):", "",
              "| connections | direct req/s | gateway req/s | direct p50 / p90 / p99 | gateway p50 / p90 / p99 "
              "| added p50 / p90 / p99 | gateway CPU per request | machine busy |",
              "|---|---|---|---|---|---|---|---|"]
    for n in (1, 16, 64):
        d, g = runs.get(f"plain_direct_{n}"), runs.get(f"plain_gateway_{n}")
        if not g:
            continue
        lines.append(f"| {n} | {_f(d and d['rps'], 0)} | {_f(g['rps'], 0)} | {_lat(d)} | {_lat(g)} | {_added(d, g)} "
                     f"| {_f(g.get('cpu_per_request_ms'), 3)} ms | {g['machine_busy']:.0%} |")
    for name, label in (("plain_gateway_16_limiter", "16, key with limits (memory://)"),
                        ("plain_gateway_16_redis_w1", "16, 1 worker, Redis limits"),
                        ("plain_gateway_16_redis_w2", "16, 2 workers, Redis limits")):
        g = runs.get(name)
        if g:
            lines.append(f"| {label} | | {_f(g['rps'], 0)} | | {_lat(g)} | | {_f(g.get('cpu_per_request_ms'), 3)} ms "
                         f"| {g['machine_busy']:.0%} |")
    lines += ["", "Streamed chat (50 events per stream; time to first token in ms):", "",
              "| streams | completed ([DONE]) | usage charged | direct TTFT p50 / p90 / p99 "
              "| gateway TTFT p50 / p90 / p99 | added TTFT p50 / p90 / p99 | CPU per chunk | CPU per stream |",
              "|---|---|---|---|---|---|---|---|"]
    for n, short in ((1, ""), (50, ""), (50, "_short")):
        d, g = runs.get(f"stream_direct_{n}{short}"), runs.get(f"stream_gateway_{n}{short}")
        if not g:
            continue
        label = f"{n} (5 events each)" if short else str(n)
        charged = f"{g.get('usage_rows', '-')} rows, {g['cost_seen']} with cost"
        lines.append(f"| {label} | {g['ok']}/{g['streams']} | {charged} | {_lat(d, 'ttft')} | {_lat(g, 'ttft')} "
                     f"| {_added(d, g, 'ttft')} "
                     f"| {_f(g.get('cpu_per_chunk_ms'), 3)} ms | {_f(g.get('cpu_per_stream_ms'), 2)} ms |")
    many = runs.get("stream_gateway_50", {})
    if "marginal_cpu_per_chunk_ms" in many:
        lines += ["", f"Split of the 50-stream CPU: {many['fixed_cpu_per_stream_ms']:.2f} ms per stream (auth, limiter,"
                  f" hold, upstream call, settle) + {many['marginal_cpu_per_chunk_ms']:.3f} ms per relayed event."]
    holds = sorted((v for k, v in runs.items() if k.startswith("hold_")), key=lambda v: v["n"])
    if holds:
        lines += ["", "Held slow streams in one worker (an event every ~1.5 s; /health sampled every 50 ms):", "",
                  "| streams | completed | charged | all open after | KB per stream | /health p50 / max while held "
                  "| /health max while opening | loop lag max (held / whole run) | longest greenlet run "
                  "| longest GC pause | worker fds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for h in holds:
            lines.append(
                f"| {h['n']:,} | {h['ok']:,} | {h['usage_rows']:,} | {_f(h.get('all_open_at_s'), 1)} s "
                f"| {_f(h.get('kb_per_stream'), 1)} | {_f(h['held']['health_p50_ms'])} / "
                f"{_f(h['held']['health_max_ms'])} ms | {_f(h['ramp']['health_max_ms'])} ms "
                f"| {h['stall_held']['stall_max_ms']:.1f} / "
                f"{h['stall_whole']['stall_max_ms']:.1f} ms | {h['stall_whole']['longest_run_ms']:.1f} ms "
                f"| {h['stall_whole']['gc_max_ms']:.1f} ms (gen {h['stall_whole']['gc_max_generation']}) "
                f"| {h.get('fds_held')} |")
    idle = r.get("idle")
    if idle:
        lines += ["", "Worker memory (RSS): " + ", ".join(f"{k.replace('rss_', '').replace('_', ' ')} "
                                                          f"{v / MB:.1f} MB" for k, v in idle.items())]
    if r.get("upstream_alone_rps"):
        lines.append(f"The fake upstream alone: {r['upstream_alone_rps']:,.0f} req/s (the best direct run); the idle "
                     f"worker uses {r.get('idle_cpu_pct', 0):.1f}% of a core.")
    if isinstance(r.get("redis"), str):
        lines.append(f"Redis: {r['redis']}")
    lines += ["", "Targets (issue 6):", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in r.get("targets", []):
        met = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met}{note} |")
    return "\n".join(lines)


PEER_ORDER = ("gateway", "floor_stack", "floor_upstream", "portkey", "litellm_w1", "litellm_w2")


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def peers_rows(r: dict) -> list[dict]:
    """One row per server of the --peers step: req/s at 16 connections, server CPU per request, latency at one
    connection and what it adds to the fake upstream alone."""
    runs, servers = r["runs"], r["peers"]["servers"]
    d1 = (runs.get("peers_direct_1") or {}).get("latency") or {}
    rows = []
    for name in sorted(servers, key=lambda n: PEER_ORDER.index(n) if n in PEER_ORDER else len(PEER_ORDER)):
        s = servers[name]
        one, many = runs.get(f"peers_{name}_1"), runs.get(f"peers_{name}_16")
        lat = (one or {}).get("latency") or {}
        p50, p99 = lat.get("p50_ms"), lat.get("p99_ms")
        # wrk counts non-2xx answers in errors; bench/load.py lists every status it saw.
        errors = {k: v for run in (one, many) if run for k, v in (run.get("errors") or {}).items()}
        errors.update({f"status {k}": v for run in (one, many) if run
                       for k, v in (run.get("statuses") or {}).items() if k != "200"})
        rows.append({
            "server": name, "label": s["label"], "error": s.get("error"), "errors": errors or None,
            "rps_16": many and many["rps"], "cpu_ms_16": many and many.get("cpu_per_request_ms"),
            "cpu_ms_1": one and one.get("cpu_per_request_ms"), "p50_ms_1": p50, "p99_ms_1": p99,
            "added_p50_ms": p50 - d1["p50_ms"] if p50 is not None and d1.get("p50_ms") is not None else None,
            "added_p99_ms": p99 - d1["p99_ms"] if p99 is not None and d1.get("p99_ms") is not None else None,
            "p99_over_p50": p99 / p50 if p50 and p99 is not None else None,
            "machine_busy_16": many and many["machine_busy"]})
    return rows


def peers_markdown(r: dict) -> str:
    """The side-by-side table and the ratios gateway / peer, ready to paste into the README."""
    c, runs, rows = r["conditions"], r["runs"], r["peers"]["table"]
    v = c["versions"]
    d1, d16 = runs.get("peers_direct_1"), runs.get("peers_direct_16")
    out = [f"**Conditions:** {c['date']}, commit {c.get('commit') or '?'}, {c['cores']} cores ({c['cpu']}), "
           f"load average {c['loadavg_at_start'][0]:.2f} at the start, Python {c['python']}, gunicorn {v['gunicorn']}, "
           f"gevent {v['gevent']}, LiteLLM {v.get('litellm')}, @portkey-ai/gateway {v.get('@portkey-ai/gateway')} on "
           f"node {v.get('node')}. Load generator: {c['load_generator']}, {r['args']['duration']:g} s per step, "
           "closed loop, keep-alive. The fake upstream, the server under test and the load generator share the "
           "same cores. Server CPU is utime + stime of the server's whole process tree from /proc, divided by "
           "the requests of the step." + (" Smoke run (--quick or short steps): noisy." if r['args']['duration'] < 10
                                          else ""),
           "",
           "| non-streamed chat | req/s, 16 conns | server CPU per request, 16 conns | CPU per request, 1 conn "
           "| p50 / p99 ms, 1 conn | added p50 / p99 ms, 1 conn | p99 / p50, 1 conn |",
           "|---|---|---|---|---|---|---|"]
    if d1 or d16:
        lat = (d1 or {}).get("latency") or {}
        out.append(f"| fake upstream alone (direct) | {_f(d16 and d16['rps'], 0)} | | | {_f(lat.get('p50_ms'))} / "
                   f"{_f(lat.get('p99_ms'))} | | |")
    for row in rows:
        if row["error"] and row["rps_16"] is None:
            out.append(f"| {row['label']} | did not run: {row['error'].splitlines()[0][:200]} | | | | | |")
            continue
        errs = f" (errors: {row['errors']})" if row["errors"] else ""
        out.append(f"| {row['label']}{errs} | {_f(row['rps_16'], 0)} | {_f(row['cpu_ms_16'])} ms "
                   f"| {_f(row['cpu_ms_1'])} ms | {_f(row['p50_ms_1'])} / {_f(row['p99_ms_1'])} "
                   f"| {_f(row['added_p50_ms'])} / {_f(row['added_p99_ms'])} | {_f(row['p99_over_p50'], 1)} |")
    fastest = max((row["rps_16"] for row in rows if row["rps_16"]), default=None)
    if d16 and fastest:
        out += ["", f"The load generator is not the bottleneck: the same {c['load_generator'].split()[0]} drove the "
                f"fake upstream alone at {d16['rps']:,.0f} req/s, {d16['rps'] / fastest:.0f} times the fastest "
                "server above."]
    gw = next((row for row in rows if row["server"] == "gateway"), None)
    floors = [row for row in rows if row["server"].startswith("floor_") and row["cpu_ms_16"] is not None]
    others = [row for row in rows if row["server"] != "gateway" and row not in floors and row["rps_16"] is not None]
    if gw and others:
        out += ["", "| gateway / peer | req/s, 16 conns (higher is better) | CPU per request, 16 conns (lower is "
                "better) | added p50, 1 conn (lower is better) | added p99, 1 conn |", "|---|---|---|---|---|"]
        for row in others:
            out.append(f"| gateway / {row['label']} | {_ratio(gw['rps_16'], row['rps_16'])} "
                       f"| {_ratio(gw['cpu_ms_16'], row['cpu_ms_16'])} "
                       f"| {_ratio(gw['added_p50_ms'], row['added_p50_ms'])} "
                       f"| {_ratio(gw['added_p99_ms'], row['added_p99_ms'])} |")
    portkey = next((row for row in others if row["server"] == "portkey"), None)
    if floors and portkey and portkey["cpu_ms_16"]:
        out += ["", "The stack's floor against Portkey's CPU per request at 16 connections (no key, limit, hold, "
                "settlement or log line; bench/floor_app.py): "
                + "; ".join(f"{row['label'].removeprefix('floor: ')}: {_ratio(row['cpu_ms_16'], portkey['cpu_ms_16'])}"
                            for row in floors) + "."]
    w1, w2 = runs.get("plain_gateway_16_redis_w1"), runs.get("plain_gateway_16_redis_w2")
    if w1 and w2:
        split = w2.get("workers_cpu_split")
        shares = f"; the two workers' shares of the CPU: {' / '.join(f'{x:.0%}' for x in split)}" if split else ""
        out += ["", f"Gateway, 16 connections with Redis limits: {w2['rps']:,.0f} req/s with 2 workers against "
                f"{w1['rps']:,.0f} with 1 ({_ratio(w2['rps'], w1['rps'])}); machine busy "
                f"{w2['machine_busy']:.0%}{shares}."]
    return "\n".join(out)


def chart(r: dict, out: Path) -> None:
    runs, panels = r["runs"], []
    for n in (1, 16, 64):
        d, g = runs.get(f"plain_direct_{n}"), runs.get(f"plain_gateway_{n}")
        if g:
            panels.append({"title": f"{n} CONN", "groups": [
                {"label": p.upper(), "direct": d and d["latency"][f"{p}_ms"], "gateway": g["latency"][f"{p}_ms"]}
                for p in ("p50", "p90", "p99")]})
    for n in (1, 50):
        d, g = runs.get(f"stream_direct_{n}"), runs.get(f"stream_gateway_{n}")
        if g and g["ttft"]["p50_ms"] is not None:
            panels.append({"title": f"TTFT {n} STREAM{'S' if n > 1 else ''}", "groups": [
                {"label": p.upper(), "direct": d and d["ttft"][f"{p}_ms"], "gateway": g["ttft"][f"{p}_ms"]}
                for p in ("p50", "p90", "p99")]})
    if panels:
        chart_mod.draw(panels, "LATENCY (MS) BY CONCURRENCY: DIRECT VS GATEWAY", str(out / "latency.png"),
                       str(out / "latency.svg"))
