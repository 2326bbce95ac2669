#!/usr/bin/env python3
"""Summarise scripts/bench-throughput.sh samples: medians, CPU per GiB, ratios; JSON + SVG.

Input: a TSV of `round  variant  bytes_per_second  bytes_received  ok|partial|fail
server_cpu_s  client_cpu_s  loadavg` (CPU columns empty for direct). A partial run (the
proxy closed the stream early) counts with its rate over the bytes it delivered, and is
reported as such. CPU seconds per GiB = the process's CPU time during the download over
the bytes received. Prints a markdown table, writes the JSON and SVG files given. Exit
status 0 always (a report, not a gate); the JSON carries `goals` with each verdict.
Standard library only.
"""
import argparse
import json
import statistics
import sys
from xml.sax.saxutils import escape

p = argparse.ArgumentParser()
p.add_argument("samples")
p.add_argument("out")
p.add_argument("--svg", default="")
p.add_argument("--size", type=int, required=True)
p.add_argument("--runs", type=int, required=True)
p.add_argument("--server", default="")
p.add_argument("--nproc", type=int, default=0)
p.add_argument("--cpu", default="")
p.add_argument("--load", default="")
p.add_argument("--quick", default="0")
a = p.parse_args()

GIB = float(1 << 30)
order, rows = [], {}
for line in open(a.samples):
    parts = line.rstrip("\n").split("\t")
    if len(parts) < 5:
        continue
    parts += [""] * (8 - len(parts))
    _, variant, speed, got, status, scpu, ccpu, load = parts[:8]
    if variant not in order:
        order.append(variant)
    rows.setdefault(variant, []).append({
        "gb_per_s": float(speed) / 1e9 if status != "fail" else None,
        "bytes": int(got or 0), "status": status,
        "server_cpu_s": float(scpu) if scpu else None, "client_cpu_s": float(ccpu) if ccpu else None,
        "loadavg": float(load) if load else None,
    })


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def per_gib(r, key):
    return r[key] / (r["bytes"] / GIB) if r[key] is not None and r["bytes"] and r["status"] != "fail" else None


summary = {}
for v in order:
    rs = rows[v]
    s = {
        "median_gb_per_s": med([r["gb_per_s"] for r in rs]),
        "min_gb_per_s": min([r["gb_per_s"] for r in rs if r["gb_per_s"] is not None], default=None),
        "max_gb_per_s": max([r["gb_per_s"] for r in rs if r["gb_per_s"] is not None], default=None),
        "complete": sum(r["status"] == "ok" for r in rs),
        "partial": sum(r["status"] == "partial" for r in rs),
        "failed": sum(r["status"] == "fail" for r in rs),
        "server_cpu_s_per_gib": med([per_gib(r, "server_cpu_s") for r in rs]),
        "client_cpu_s_per_gib": med([per_gib(r, "client_cpu_s") for r in rs]),
        "pair_cpu_s_per_gib": med([(per_gib(r, "server_cpu_s") or 0) + (per_gib(r, "client_cpu_s") or 0)
                                   if per_gib(r, "server_cpu_s") is not None else None for r in rs]),
        "median_loadavg": med([r["loadavg"] for r in rs]),
        "samples": rs,
    }
    summary[v] = s

names = {"direct": "curl direct", "ours": "anytls-rs pair", "baseline": "anytls-rs pair, baseline build", "crate": "crates.io anytls 0.5.3 pair",
         "sing-box": "sing-box pair", "mihomo": "mihomo pair"}
peers = [v for v in order if v not in ("direct", "ours", "baseline") and summary[v]["median_gb_per_s"]]
best_peer = max(peers, key=lambda v: summary[v]["median_gb_per_s"], default=None)
# The lowest pair CPU per GiB among the peers, for the CPU comparison.
cpu_peers = [v for v in peers if summary[v]["pair_cpu_s_per_gib"]]
leanest_peer = min(cpu_peers, key=lambda v: summary[v]["pair_cpu_s_per_gib"], default=None)


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


print()
print("| variant | median GB/s | min | max | vs direct | CPU s/GiB server | client | pair | complete/partial/failed |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
direct = summary.get("direct", {}).get("median_gb_per_s")
for v in order:
    s = summary[v]
    vs = s["median_gb_per_s"] / direct if s["median_gb_per_s"] and direct else None
    print(f"| {names.get(v, v)} | {fmt(s['median_gb_per_s'])} | {fmt(s['min_gb_per_s'])} | {fmt(s['max_gb_per_s'])} "
          f"| {fmt(vs, 2)} | {fmt(s['server_cpu_s_per_gib'], 2)} | {fmt(s['client_cpu_s_per_gib'], 2)} "
          f"| {fmt(s['pair_cpu_s_per_gib'], 2)} | {s['complete']}/{s['partial']}/{s['failed']} |")
if any(summary[v]["partial"] for v in order):
    print()
    print("partial = the proxy closed the stream before the end; its rate is over the bytes delivered.")


def ratio(x, y):
    return x / y if x is not None and y else None


ours = summary.get("ours", {})
ours_best = ratio(ours.get("median_gb_per_s"), summary[best_peer]["median_gb_per_s"] if best_peer else None)
ours_direct = ratio(ours.get("median_gb_per_s"), direct)
goals = {
    "ours_over_best_peer >= 1.5": (ours_best, None if ours_best is None else ours_best >= 1.5),
    "ours_over_direct >= 0.5": (ours_direct, None if ours_direct is None else ours_direct >= 0.5),
    "pair_cpu_s_per_gib <= 1.4": (ours.get("pair_cpu_s_per_gib"),
                                  None if ours.get("pair_cpu_s_per_gib") is None else ours["pair_cpu_s_per_gib"] <= 1.4),
    "server_cpu_s_per_gib <= 0.7": (ours.get("server_cpu_s_per_gib"),
                                    None if ours.get("server_cpu_s_per_gib") is None
                                    else ours["server_cpu_s_per_gib"] <= 0.7),
}
print()
print(f"best peer by GB/s: {names.get(best_peer, best_peer) if best_peer else 'none measured'}; "
      f"leanest peer by pair CPU: {names.get(leanest_peer, leanest_peer) if leanest_peer else 'none measured'}")
for goal, (value, met) in goals.items():
    verdict = "n/a" if met is None else ("met" if met else "NOT met")
    print(f"goal {goal}: {fmt(value, 2)} ({verdict})")
print(f"machine: nproc={a.nproc}, cpu={a.cpu!r}; load average {a.load}; file {a.size >> 20} MiB served by "
      f"{a.server}; {a.runs} rounds, order rotating")

result = {
    "benchmark": "curl download through SOCKS5, interleaved rounds; CPU from /proc/PID/stat",
    "file_bytes": a.size,
    "rounds": a.runs,
    "quick": a.quick == "1",
    "file_server": a.server,
    "machine": {"nproc": a.nproc, "cpu": a.cpu, "loadavg_before_after": a.load},
    "unit": "GB/s (1e9 bytes/s); CPU seconds per GiB (2^30 bytes received)",
    "variants": summary,
    "best_peer": best_peer,
    "leanest_peer": leanest_peer,
    "ratios": {"ours_over_best_peer": ours_best, "ours_over_direct": ours_direct},
    "goals": {k: {"value": v, "met": m} for k, (v, m) in goals.items()},
}
with open(a.out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

if a.svg:
    # Two panels of bars, one bar per variant: throughput, and pair CPU per GiB split
    # into server (dark) and client (light).
    colors = {"direct": "#7f7f7f", "ours": "#1f77b4", "baseline": "#aec7e8", "crate": "#d62728", "sing-box": "#ff7f0e", "mihomo": "#2ca02c"}
    pw, ph, margin, top = 340, 240, 50, 60
    width, height = margin + 2 * (pw + margin), top + ph + 100
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{margin}" y="22" font-size="15" font-weight="bold">Bulk download through each pair '
           f'({"quick, " if a.quick == "1" else ""}medians of {a.runs} rounds of {a.size >> 20} MiB)</text>',
           f'<text x="{margin}" y="40" fill="#555">nproc {a.nproc}, load average {escape(a.load)}</text>']
    panels = [("Throughput (GB/s, higher is better)", lambda s: [(s["median_gb_per_s"], 1.0)]),
              ("CPU s per GiB: server | client (lower is better)",
               lambda s: [(s["server_cpu_s_per_gib"], 1.0), (s["client_cpu_s_per_gib"], 0.45)])]
    for i, (title, get) in enumerate(panels):
        x0 = margin + i * (pw + margin)
        stacks = [(v, [(x, o) for x, o in get(summary[v]) if x is not None]) for v in order]
        top_value = max([sum(x for x, _ in st) for _, st in stacks] + [1e-9]) * 1.15
        svg.append(f'<text x="{x0}" y="{top - 8}" font-size="13">{escape(title)}</text>')
        svg.append(f'<line x1="{x0}" y1="{top + ph}" x2="{x0 + pw}" y2="{top + ph}" stroke="black"/>')
        slot = pw / max(len(stacks), 1)
        for j, (v, stack) in enumerate(stacks):
            bx, bw, base = x0 + j * slot + slot * 0.15, slot * 0.7, top + ph
            for x, opacity in stack:
                bh = ph * x / top_value
                svg.append(f'<rect x="{bx:.1f}" y="{base - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                           f'fill="{colors.get(v, "#9467bd")}" fill-opacity="{opacity}"/>')
                base -= bh
            label = f"{sum(x for x, _ in stack):.2f}" if stack else "n/a"
            svg.append(f'<text x="{bx + bw / 2:.1f}" y="{base - 4:.1f}" text-anchor="middle">{label}</text>')
            svg.append(f'<text x="{bx + bw / 2:.1f}" y="{top + ph + 14}" text-anchor="end" '
                       f'transform="rotate(-35 {bx + bw / 2:.1f} {top + ph + 14})">{escape(names.get(v, v))}</text>')
    svg.append("</svg>")
    with open(a.svg, "w") as f:
        f.write("\n".join(svg) + "\n")
print(f"wrote {a.out}" + (f" and {a.svg}" if a.svg else ""), file=sys.stderr)
