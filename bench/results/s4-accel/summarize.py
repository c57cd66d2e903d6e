#!/usr/bin/env python3
"""Median over alternated runs of each build: accel ratios, per-process CPU ms/GiB, in-process device side.
usage: summarize.py TAG [TAG…]   (reads TAG-before-N.json / TAG-after-N.json and TAG-*.txt for the load; several
tags pool their runs, for batches of the same two builds)"""
import glob, json, re, statistics, sys
tags = sys.argv[1:]
tag = "+".join(tags)
rows = [
    ("pre-copy 1 GiB, ratio to raw", "device memory pre-copy throughput", "Ratio", None),
    ("stop-copy 1 GiB, ratio to raw", "device memory stop-copy throughput (no pre-copy)", "Ratio", None),
    ("stop-copy interleaved 64 MiB slices, ratio", "interleaved 64 MiB slices", "Ratio", None),
    ("bare device vs raw (transport), ratio", "breakdown: bare-copy device", "Ratio", None),
    ("accelerator vs bare device (stream), ratio", "breakdown: accelerator vs bare", "Ratio", None),
    ("source+target server CPU, accel vs raw, ratio", "server CPU per MiB, stop-copy, accelerator", "Ratio", None),
    ("source+target server CPU µs/MiB, accel", "server CPU per MiB, stop-copy, accelerator", "Value", None),
    ("source+target server CPU µs/MiB, raw", "server CPU per MiB, stop-copy, accelerator", "Baseline", None),
    ("source+target server CPU, bare device vs raw, ratio", "server CPU per MiB, stop-copy, bare zero-copy", "Ratio", None),
    ("stop-copy migration CPU ms/GiB, 3 processes, vmig", "all three processes, stop-copy", "Value", None),
    ("stop-copy migration CPU ms/GiB, 3 processes, raw", "all three processes, stop-copy", "Baseline", None),
] + [
    # Per-process CPU extras of the two "all three processes" rows: (label, figure, who).
    (f"  {label} ms/GiB ({mode})", f"all three processes, {mode}", "Extra", f"{who}, CPU ms/GiB (median)")
    for mode, label, who in [
        ("stop-copy", "source device host", "vmig source device host"),
        ("stop-copy", "target device host", "vmig target device host"),
        ("stop-copy", "client", "vmig client (bench)"),
        ("stop-copy", "raw server A", "raw raw server A (reads)"),
        ("stop-copy", "raw server B", "raw raw server B (writes)"),
        ("stop-copy", "raw client", "raw client (bench)"),
        ("pre-copy", "source device host", "vmig source device host"),
        ("pre-copy", "target device host", "vmig target device host"),
    ]
] + [
    ("in-process save+load vs bare copies, ratio", "device side of stop-copy", "Ratio", None),
    ("in-process zero-copy save µs/MiB (best)", "device side of stop-copy", "Extra", "zero-copy save (STOP_COPY gather: CRC32C over device memory in place, no copy), µs/MiB, best migration"),
    ("in-process zero-copy load µs/MiB (best)", "device side of stop-copy", "Extra", "zero-copy load (a copy into the device's span standing for the socket receive, then CRC32C in place), µs/MiB, best migration"),
    ("in-process zero-copy save µs per 1 MiB message, p50", "device side of stop-copy", "Extra", "zero-copy save, µs per 1 MiB message, p50"),
    ("in-process zero-copy load µs per 1 MiB message, p50", "device side of stop-copy", "Extra", "zero-copy load, µs per 1 MiB message, p50"),
    ("in-process zero-copy load µs per 1 MiB message, p10", "device side of stop-copy", "Extra", "zero-copy load, µs per 1 MiB message, p10"),
    ("in-process CRC32C alone µs/MiB (best)", "device side of stop-copy", "Extra", "CRC32C alone over device memory, µs/MiB, best of 5 passes"),
    ("warm-up pre-copy into never-written target, MiB/s", "device memory pre-copy throughput", "Extra", "warm-up pre-copy migration into a never-written target VF (first-touch faults), MiB/s"),
    ("warm-up: target host CPU ms/GiB", "device memory pre-copy throughput", "Extra", "warm-up: target device host CPU ms/GiB"),
]
def val(fig, kind, key):
    if kind == "Extra":
        return fig["Extra"].get(key)
    return fig[kind]["Median"]
out = {}
loads = {}
for arm in ("before", "after"):
    files = sorted(f for t in tags for f in glob.glob(f"{t}-{arm}-*.json"))
    for f in files:
        txt = open(f[:-5] + ".txt").read()
        loads.setdefault(arm, []).extend(float(m) for m in re.findall(r"load (?:before|after): ([\d.]+)", txt))
    for label, name, kind, key in rows:
        vs = []
        for f in files:
            for fig in json.load(open(f))["Figures"]:
                if name in fig["Name"]:
                    v = val(fig, kind, key)
                    if v is not None:
                        vs.append(v)
                    break
        out.setdefault(label, {})[arm] = vs
print(f"{tag}: runs per arm: before {sum(len(glob.glob(t+'-before-*.json')) for t in tags)}, after {sum(len(glob.glob(t+'-after-*.json')) for t in tags)}; "
      f"1-min load average at start/end of each run: before {loads.get('before')}, after {loads.get('after')}")
print(f"{'figure (median of per-run medians)':58} {'before':>9} {'after':>9}   per-run values before | after")
for label, _, _, _ in rows:
    b, a = out[label].get("before", []), out[label].get("after", [])
    fmt = lambda xs: f"{statistics.median(xs):9.3f}" if xs else f"{'-':>9}"
    print(f"{label:58} {fmt(b)} {fmt(a)}   {[round(x,3) for x in b]} | {[round(x,3) for x in a]}")
