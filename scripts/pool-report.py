#!/usr/bin/env python3
"""Summarise test_pool_performance.sh: medians per variant, a markdown table with ratios
against direct, results/pool-performance.json and a hand-written SVG bar chart.

Inputs: the JSONL of runs (one anytls-bench --json result per line, wrapped with round,
variant, workload, the socket counters, the CPU seconds the pair's server and client used
during the run and the load average) and a TSV of `variant  server_kib  client_kib
note` (VmHWM). CPU per unit of work: bulk in seconds per GiB moved (both directions),
rr in seconds per 1,000 requests; medians over rounds. Standard library only.
"""
import argparse
import json
import os
import statistics
import sys
from xml.sax.saxutils import escape

p = argparse.ArgumentParser()
p.add_argument("results")
p.add_argument("rss")
p.add_argument("--out-dir", required=True)
p.add_argument("--rr-requests", type=int, required=True)
p.add_argument("--quick", default="0")
p.add_argument("--runs", type=int, default=0)
p.add_argument("--nproc", type=int, default=0)
p.add_argument("--cpu", default="")
p.add_argument("--load", default="")
a = p.parse_args()
GIB = float(1 << 30)

runs = [json.loads(line) for line in open(a.results) if line.strip()]
variants = []
for r in runs:
    if r["variant"] not in variants:
        variants.append(r["variant"])
rss = {}
for line in open(a.rss):
    parts = line.rstrip("\n").split("\t")
    if len(parts) >= 3:
        to_mib = lambda kib: round(int(kib) / 1024, 1) if kib.isdigit() else None
        rest = parts[3:] + [""] * (4 - len(parts[3:]))
        rss[parts[0]] = {"server_mib": to_mib(parts[1]), "client_mib": to_mib(parts[2]), "note": rest[0],
                         "server_reuse_pct": float(rest[1]) if rest[1] else None,
                         "server_stats": rest[2] or None, "client_stats": rest[3] or None}


def dig(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def median_of(variant, workload, *path, wrapper=False):
    """Median of a number in the anytls-bench result (or, with wrapper, in the run record)."""
    values = []
    for r in runs:
        if r["variant"] == variant and r["workload"] == workload:
            v = dig(r if wrapper else r["result"], *path)
            if isinstance(v, (int, float)):
                values.append(v)
    return statistics.median(values) if values else None


def cpu_per_unit(variant, workload, unit_of):
    """Medians of server, client and pair CPU seconds per unit of work (unit_of(result)).
    Bulk runs with a failed transfer are left out: the CPU spent on a transfer whose bytes
    are not counted would inflate the figure (the Go pairs end a stream at the first FIN,
    so the upload's reply, sent after the upload's end, never arrives)."""
    per = {"server": [], "client": [], "pair": []}
    for r in runs:
        if r["variant"] != variant or r["workload"] != workload:
            continue
        if workload == "bulk" and dig(r["result"], "failed"):
            continue
        units, sc, cc = unit_of(r["result"]), r.get("server_cpu_s"), r.get("client_cpu_s")
        if not units or sc is None or cc is None:
            continue
        per["server"].append(sc / units)
        per["client"].append(cc / units)
        per["pair"].append((sc + cc) / units)
    return {k: (statistics.median(v) if v else None) for k, v in per.items()}


def gib_moved(result):
    return ((dig(result, "download", "bytes") or 0) + (dig(result, "upload", "bytes") or 0)) / GIB


def thousands_of_requests(result):
    return (dig(result, "ok") or 0) / 1000


def total_of(variant, workload, *path):
    return sum(dig(r["result"], *path) or 0 for r in runs if r["variant"] == variant and r["workload"] == workload)


summary = {}
for v in variants:
    rr_ok = median_of(v, "rr", "ok")
    opens = median_of(v, "rr", "active_opens_delta", wrapper=True)
    s = {
        "download_gbit_per_sec": median_of(v, "bulk", "download", "gbit_per_sec"),
        "upload_gbit_per_sec": median_of(v, "bulk", "upload", "gbit_per_sec"),
        "streams_per_sec": median_of(v, "rr", "streams_per_sec"),
        "latency_ms": {q: median_of(v, "rr", "latency_ms", q) for q in ("p50", "p90", "p99", "max")},
        "hold_echo_p99_ms": median_of(v, "hold", "echo_ms", "p99"),
        "bulk_cpu_s_per_gib": cpu_per_unit(v, "bulk", gib_moved),
        "rr_cpu_s_per_1000_requests": cpu_per_unit(v, "rr", thousands_of_requests),
        "median_loadavg": statistics.median([r["loadavg"] for r in runs if r["variant"] == v and r.get("loadavg")]
                                            or [0]),
        "hold_open_p99_ms": median_of(v, "hold", "open_ms", "p99"),
        # New-stream latency: streams opened one at a time, then N at once (open1/openn).
        "open_latency_ms": {w: {q: median_of(v, w, "open_ms", q) for q in ("p50", "p99")} for w in ("open1", "openn")},
        "open_concurrency": {w: median_of(v, w, "streams") for w in ("open1", "openn")},
        "time_wait_per_rr_run": median_of(v, "rr", "time_wait_delta", wrapper=True),
        "tcp_opens_per_1000_requests": (opens / rr_ok * 1000) if opens is not None and rr_ok else None,
        "failures": {w: total_of(v, w, "failed") for w in ("bulk", "rr", "hold", "open1", "openn")},
        "first_errors": sorted({dig(r["result"], "first_error") for r in runs
                                if r["variant"] == v and dig(r["result"], "first_error")})[:3],
        "peak_rss_mib": {k: rss.get(v, {}).get(k) for k in ("server_mib", "client_mib")},
        "note": rss.get(v, {}).get("note", ""),
        "server_reuse_pct": rss.get(v, {}).get("server_reuse_pct"),
        "last_pool_stats": {k: rss.get(v, {}).get(k + "_stats") for k in ("server", "client")},
    }
    summary[v] = s

direct = summary.get("direct", {})

# A row that measured nothing (every round of a workload failed, so its figure reads 0 or
# is missing) is no comparison at all: say so, and fail the script, rather than print 0.00.
# Known failures of a peer, seen in its own interop tests too, are noted instead.
KNOWN_FAILURES = {
    ("crate", "upload Gbit/s"): "the crates.io pair (0.5.3) closes a stream whose inbound PUSH queue fills "
                                "instead of applying backpressure (tests/interop.rs lists it), so a fast upload is cut off",
    ("crate", "download Gbit/s"): "the crates.io client (0.5.3) cuts large responses short (tests/interop.rs lists it)",
}
measured_nothing = []
for v in variants:
    ran = {r["workload"] for r in runs if r["variant"] == v}
    checks = [("bulk", "download Gbit/s", summary[v]["download_gbit_per_sec"]),
              ("bulk", "upload Gbit/s", summary[v]["upload_gbit_per_sec"]),
              ("rr", "new streams/s", summary[v]["streams_per_sec"])]
    for workload, what, value in checks:
        if workload in ran and not value:
            errors = "; ".join(summary[v]["first_errors"]) or "no error recorded"
            if (v, what) in KNOWN_FAILURES:
                print(f"NOTE {v}: {what} measured nothing, a known failure: {KNOWN_FAILURES[(v, what)]}")
            else:
                measured_nothing.append(f"{v}: {what} measured nothing ({errors})")


def ratio(v, key, sub=None):
    x = summary[v][key] if sub is None else summary[v][key][sub]
    d = direct.get(key) if sub is None else (direct.get(key) or {}).get(sub)
    return x / d if x is not None and d else None


def cell(x, r=None, digits=2):
    if x is None:
        return "-"
    text = f"{x:.{digits}f}"
    return f"{text} ({r:.2f}x)" if r is not None else text


# Every variant that is neither the baseline nor a peer is one of our pool engines (the
# script takes them from `anytls-server --list-pool-types`, so none is named here).
peers = {"crate": "crates.io anytls 0.5.3", "sing-box": "sing-box", "mihomo": "mihomo"}
ours_variants = [v for v in variants if v != "direct" and v not in peers]
peer_variants = [v for v in variants if v in peers]
names = {"direct": "direct", **peers, **{v: f"ours {v}" for v in ours_variants}}
def pair_text(cpu):
    if cpu["server"] is None:
        return "-"
    return f"{cpu['server']:.2f} / {cpu['client']:.2f}"


print()
print("| variant | down Gbit/s | up Gbit/s | new streams/s | p50 ms | p90 ms | p99 ms | hold echo p99 ms "
      "| bulk CPU s/GiB server / client | rr CPU s/1k req server / client "
      "| RSS server / client MiB | TIME_WAIT per rr run | TCP opens / 1k req | server reuse % | failures bulk/rr/hold |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for v in variants:
    s = summary[v]
    lat = s["latency_ms"]
    mem = s["peak_rss_mib"]
    mem_text = "-" if v == "direct" else f"{mem['server_mib']} / {mem['client_mib']}"
    f = s["failures"]
    label = names.get(v, v) + (f" ({s['note']})" if s["note"] else "")
    print(f"| {label} | {cell(s['download_gbit_per_sec'], ratio(v, 'download_gbit_per_sec'))} "
          f"| {cell(s['upload_gbit_per_sec'], ratio(v, 'upload_gbit_per_sec'))} "
          f"| {cell(s['streams_per_sec'], ratio(v, 'streams_per_sec'), 0)} "
          f"| {cell(lat['p50'], ratio(v, 'latency_ms', 'p50'))} | {cell(lat['p90'], ratio(v, 'latency_ms', 'p90'))} "
          f"| {cell(lat['p99'], ratio(v, 'latency_ms', 'p99'))} | {cell(s['hold_echo_p99_ms'])} "
          f"| {pair_text(s['bulk_cpu_s_per_gib'])} | {pair_text(s['rr_cpu_s_per_1000_requests'])} | {mem_text} "
          f"| {cell(s['time_wait_per_rr_run'], None, 0)} | {cell(s['tcp_opens_per_1000_requests'], None, 0)} "
          f"| {cell(s['server_reuse_pct'], None, 1)} | {f['bulk']}/{f['rr']}/{f['hold']} |")
print()
print("Medians over rounds; (N x) = ratio to direct. TIME_WAIT and TCP opens are system-wide counters "
      f"sampled around each rr run of {a.rr_requests} requests. Server reuse % = the reuse rate of the "
      "server's last [Pool Stats] line: streams served by a warm connection, over the whole run.")

if any(summary[v]["open_latency_ms"]["open1"]["p50"] is not None for v in variants):
    n = next((summary[v]["open_concurrency"]["openn"] for v in variants if summary[v]["open_concurrency"]["openn"]), None)
    print()
    print(f"New-stream latency (ms from SOCKS connect to the proxy's answer), one at a time and {n:.0f} at once:")
    print()
    print(f"| variant | 1 at a time p50 | p99 | {n:.0f} at once p50 | p99 | failures |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        o, f = summary[v]["open_latency_ms"], summary[v]["failures"]
        print(f"| {names.get(v, v)} | {cell(o['open1']['p50'])} | {cell(o['open1']['p99'])} | {cell(o['openn']['p50'])} "
              f"| {cell(o['openn']['p99'])} | {f['open1']}/{f['openn']} |")


def best(candidates, key, lowest=False):
    scored = [(key(summary[v]), v) for v in candidates if key(summary[v]) is not None]
    if not scored:
        return None, None
    value, v = (min if lowest else max)(scored)
    return v, value


comparison = {}
for what, key, lowest in [("download Gbit/s", lambda s: s["download_gbit_per_sec"], False),
                          ("new streams/s", lambda s: s["streams_per_sec"], False),
                          ("bulk pair CPU s/GiB", lambda s: s["bulk_cpu_s_per_gib"]["pair"], True),
                          ("rr pair CPU s/1k requests", lambda s: s["rr_cpu_s_per_1000_requests"]["pair"], True)]:
    ours_v, ours_x = best(ours_variants, key, lowest)
    peer_v, peer_x = best(peer_variants, key, lowest)
    r = (ours_x / peer_x) if ours_x is not None and peer_x else None
    comparison[what] = {"ours": ours_v, "ours_value": ours_x, "best_peer": peer_v, "best_peer_value": peer_x,
                        "ratio": r}
    if ours_v and peer_v:
        print(f"{what}: best of ours {names[ours_v]} {ours_x:.2f}, best peer {names.get(peer_v, peer_v)} "
              f"{peer_x:.2f} -> ours/peer {r:.2f}x")
print("CPU = user + system seconds of each process during the run (/proc/PID/stat), per GiB moved (bulk, both "
      f"directions; runs with a failed transfer left out) and per 1,000 completed requests (rr). "
      f"Load average {a.load}.")
for v in variants:
    for err in summary[v]["first_errors"]:
        print(f"  {names.get(v, v)}: first error seen: {err}")

machine = {"nproc": a.nproc, "cpu": a.cpu}
out = {"machine": machine, "quick": a.quick == "1", "rounds": a.runs, "rr_requests": a.rr_requests,
       "loadavg_before_after": a.load, "variants": summary, "ours_vs_best_peer": comparison, "runs": runs}
json_path = os.path.join(a.out_dir, "pool-performance.json")
with open(json_path, "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")

# --- SVG: three panels of bars, one bar per variant ---------------------------------
panels = [
    ("Download throughput", "Gbit/s", lambda s: s["download_gbit_per_sec"]),
    ("New streams per second (rr)", "streams/s", lambda s: s["streams_per_sec"]),
    ("rr latency p99 (lower is better)", "ms", lambda s: s["latency_ms"]["p99"]),
    ("Bulk CPU, pair (lower is better)", "CPU s per GiB", lambda s: s["bulk_cpu_s_per_gib"]["pair"]),
    ("rr CPU, pair (lower is better)", "CPU s per 1,000 requests", lambda s: s["rr_cpu_s_per_1000_requests"]["pair"]),
]
colors = {"direct": "#7f7f7f", "crate": "#d62728", "sing-box": "#ff7f0e", "mihomo": "#2ca02c"}
# Ours in blues and purples, in the order the engines were run.
ours_palette = ["#1f77b4", "#17becf", "#9467bd", "#8c564b", "#e377c2", "#bcbd22"]
colors.update({v: ours_palette[i % len(ours_palette)] for i, v in enumerate(ours_variants)})
pw, ph, margin, top = 260, 240, 40, 50
width, height = margin + len(panels) * (pw + margin), top + ph + 90
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
       f'font-family="sans-serif" font-size="11">',
       f'<rect width="{width}" height="{height}" fill="white"/>',
       f'<text x="{margin}" y="22" font-size="15" font-weight="bold">anytls-rs pool performance '
       f'({"quick, " if a.quick == "1" else ""}medians of {a.runs} rounds; nproc {a.nproc}; '
       f'load average {escape(a.load)})</text>']
for i, (title, unit, get) in enumerate(panels):
    x0 = margin + i * (pw + margin)
    values = [(v, get(summary[v])) for v in variants]
    top_value = max([x for _, x in values if x] or [1]) * 1.15
    svg.append(f'<text x="{x0}" y="{top - 12}" font-size="13">{escape(title)}</text>')
    svg.append(f'<line x1="{x0}" y1="{top + ph}" x2="{x0 + pw}" y2="{top + ph}" stroke="black"/>')
    slot = pw / max(len(values), 1)
    for j, (v, x) in enumerate(values):
        bx = x0 + j * slot + slot * 0.15
        bw = slot * 0.7
        if x is not None:
            bh = ph * x / top_value
            svg.append(f'<rect x="{bx:.1f}" y="{top + ph - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                       f'fill="{colors.get(v, "#ff7f0e")}"/>')
            label = f"{x:.0f}" if x >= 100 else f"{x:.2f}"
            svg.append(f'<text x="{bx + bw / 2:.1f}" y="{top + ph - bh - 4:.1f}" text-anchor="middle">{label}</text>')
        else:
            svg.append(f'<text x="{bx + bw / 2:.1f}" y="{top + ph - 4}" text-anchor="middle">n/a</text>')
        svg.append(f'<text x="{bx + bw / 2:.1f}" y="{top + ph + 14}" text-anchor="end" '
                   f'transform="rotate(-35 {bx + bw / 2:.1f} {top + ph + 14})">{escape(names.get(v, v))}</text>')
    svg.append(f'<text x="{x0}" y="{top + ph + 80}" fill="#555">{escape(unit)}</text>')
svg.append("</svg>")
svg_path = os.path.join(a.out_dir, "pool-performance.svg")
with open(svg_path, "w") as f:
    f.write("\n".join(svg) + "\n")
print(f"wrote {json_path} and {svg_path}", file=sys.stderr)

if measured_nothing:
    for line in measured_nothing:
        print(f"FAIL {line}")
    sys.exit(3)

