#!/usr/bin/env python3
"""Summarises the runs of `Vmig.Bench --runs 5 nvme` in this folder, per figure and per build (before-*: main at
48dad06; lend-*: DMA span lending; after-*: lending + the lean driver wait): the median over runs of each run's median
ratio (vmig ÷ raw pread/pwrite of the same run), its [min..max], and the median of the runs' QD1 p50 latency and
in-process stage p50s (fetch / command / reap, µs)."""
import glob, json, os, statistics as st, sys

here = os.path.dirname(os.path.abspath(__file__))
kinds = sys.argv[1:] or ["before", "after"]

def load(kind):
    rows = {}
    for p in sorted(glob.glob(os.path.join(here, f"{kind}-*.json"))):
        for f in json.load(open(p))["Figures"]:
            r = rows.setdefault(f["Name"], {"ratio": [], "p50": [], "stages": []})
            r["ratio"].append(f["Ratio"]["Median"])
            ex = f["Extra"]
            if "vmig latency p50 µs" in ex:
                r["p50"].append(ex["vmig latency p50 µs"])
            st3 = [v for k, v in ex.items() if k.startswith("p50 µs:")]
            if len(st3) == 3:
                r["stages"].append(st3)
    return rows

data = {k: load(k) for k in kinds}
def fmt(r):
    if not r:
        return "—"
    s = f"{st.median(r['ratio']):.3f} [{min(r['ratio']):.3f}..{max(r['ratio']):.3f}] n={len(r['ratio'])}"
    if r["p50"]:
        s += f", p50 {st.median(r['p50']):.1f} µs"
    if r["stages"]:
        s += " (" + " / ".join(f"{st.median(x[i] for x in r['stages']):.1f}" for i in range(3)) + ")"
    return s
print("| figure | " + " | ".join(kinds) + " |")
print("|---|" + "---|" * len(kinds))
for name in data[kinds[-1]]:
    print(f"| {name} | " + " | ".join(fmt(data[k].get(name)) for k in kinds) + " |")
