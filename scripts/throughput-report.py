#!/usr/bin/env python3
"""Summarise scripts/bench-throughput.sh samples: medians, ratios, verdict; write JSON.

Input: a TSV of `round  variant  bytes_per_second  bytes_received  ok|partial|fail`.
A partial run (the proxy closed the stream early) counts with its rate over the bytes it
delivered, and is reported as such. Prints a small markdown table
and writes the JSON file given. Exit status 0 always (it is a report, not a gate);
the JSON carries `meets_goal`.
"""
import argparse
import json
import statistics
import sys

p = argparse.ArgumentParser()
p.add_argument("samples")
p.add_argument("out")
p.add_argument("--size", type=int, required=True)
p.add_argument("--runs", type=int, required=True)
p.add_argument("--server", default="")
p.add_argument("--nproc", type=int, default=0)
p.add_argument("--cpu", default="")
p.add_argument("--quick", default="0")
a = p.parse_args()

speeds, failures, partials = {}, {}, {}
order = []
for line in open(a.samples):
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 5:
        continue
    _, variant, speed, _, status = parts
    if variant not in order:
        order.append(variant)
    if status == "fail":
        failures[variant] = failures.get(variant, 0) + 1
        continue
    if status == "partial":
        partials[variant] = partials.get(variant, 0) + 1
    speeds.setdefault(variant, []).append(float(speed) / 1e9)

median = {v: statistics.median(s) for v, s in speeds.items() if s}


def ratio(a_, b_):
    if a_ in median and b_ in median and median[b_] > 0:
        return median[a_] / median[b_]
    return None


names = {"direct": "curl direct", "ours": "curl via anytls-rs pair", "peer": "curl via crates.io anytls 0.5.3"}
print()
print("| variant | median GB/s | min | max | complete | partial | failed |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for v in order:
    s = speeds.get(v, [])
    part, fail = partials.get(v, 0), failures.get(v, 0)
    if s:
        print(f"| {names.get(v, v)} | {median[v]:.3f} | {min(s):.3f} | {max(s):.3f} | {len(s) - part} | {part} | {fail} |")
    else:
        print(f"| {names.get(v, v)} | - | - | - | 0 | {part} | {fail} |")
if partials:
    print()
    print("partial = the proxy closed the stream before the end; its rate is over the bytes delivered.")
ours_peer, ours_direct, peer_direct = ratio("ours", "peer"), ratio("ours", "direct"), ratio("peer", "direct")
fmt = lambda r: "n/a" if r is None else f"{r:.2f}x"
print()
print(f"ours/peer = {fmt(ours_peer)} (goal >= 1.30x)   ours/direct = {fmt(ours_direct)} (goal ~0.25x)   "
      f"peer/direct = {fmt(peer_direct)}")
print(f"machine: nproc={a.nproc}, cpu={a.cpu!r}; file {a.size >> 20} MiB served by {a.server}; {a.runs} rounds")
meets = None
if ours_peer is not None:
    meets = ours_peer >= 1.3
    print("verdict: " + ("ours beats the peer by >= 1.3x" if meets else "ours is BELOW 1.3x the peer"))

result = {
    "benchmark": "curl download through SOCKS5, interleaved rounds",
    "file_bytes": a.size,
    "rounds": a.runs,
    "quick": a.quick == "1",
    "file_server": a.server,
    "machine": {"nproc": a.nproc, "cpu": a.cpu},
    "unit": "GB/s (1e9 bytes/s)",
    "variants": {
        v: {
            "median": median.get(v),
            "samples": speeds.get(v, []),
            "partial": partials.get(v, 0),
            "failed": failures.get(v, 0),
        }
        for v in order
    },
    "ratios": {"ours_over_peer": ours_peer, "ours_over_direct": ours_direct, "peer_over_direct": peer_direct},
    "goal": {"ours_over_peer_min": 1.3, "ours_over_direct_target": 0.25},
    "meets_goal": meets,
}
with open(a.out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
print(f"wrote {a.out}", file=sys.stderr)
