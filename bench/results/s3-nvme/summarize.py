#!/usr/bin/env python3
"""Summarises the runs of `Vmig.Bench --runs 5 nvme` in this folder: per figure, the median over runs of each run's
median ratio (vmig ÷ raw pread/pwrite), its range, and the median QD1 p50 latency. before-*: main's code; stage1-*:
adaptive poller + poll queues with a sched_yield every 16 polls; after-*: the final code (a yield every 2 polls).
Before-change rows are named without a completion mode; they used MSI-X, so they are matched to the "MSI-X" rows."""
import glob, json, os, re, statistics as st

here = os.path.dirname(os.path.abspath(__file__))

def load(kind):
    rows = {}
    for p in sorted(glob.glob(os.path.join(here, f"{kind}-*.json"))):
        d = json.load(open(p))
        for f in d["Figures"]:
            name = f["Name"]
            if kind == "before":
                if "CQ poll" in name:
                    name = name.replace(", CQ poll 20 µs", ", MSI-X + CQ poll 20 µs at QD≥2")
                else:
                    name = re.sub(r"shadow (on|off)$", r"shadow \1, MSI-X", name)
            r = rows.setdefault(name, {"ratio": [], "p50": []})
            r["ratio"].append(f["Ratio"]["Median"])
            if "vmig latency p50 µs" in f["Extra"]:
                r["p50"].append(f["Extra"]["vmig latency p50 µs"])
    return rows

before, stage1, after = load("before"), load("stage1"), load("after")
def fmt(r):
    if not r:
        return "—"
    s = f"{st.median(r['ratio']):.3f} [{min(r['ratio']):.3f}..{max(r['ratio']):.3f}] n={len(r['ratio'])}"
    if r["p50"]:
        s += f", p50 {st.median(r['p50']):.1f} µs"
    return s
print("| figure | before (main): ratio median of runs [min..max], QD1 p50 | stage 1 (yield/16 polls) | after |")
print("|---|---|---|---|")
for name in list(after) + [n for n in before if n not in after]:
    print(f"| {name} | {fmt(before.get(name))} | {fmt(stage1.get(name))} | {fmt(after.get(name))} |")
