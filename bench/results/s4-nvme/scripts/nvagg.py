import json,glob,sys
d=sys.argv[1]
files=sorted(glob.glob(d+'/nvme-*.json'))
data={f.split('/')[-1][5:-5]:json.load(open(f)) for f in files}
names=[x['Name'] for x in list(data.values())[0]['Figures'] if 'shadow on' in x['Name']]
print("ratio (IOPS ÷ raw) medians per run; p50 µs where reported")
print(f"{'figure':80s} "+' '.join(f"{k:>12s}" for k in data))
for n in names:
    row=[]
    for k,j in data.items():
        f=[x for x in j['Figures'] if x['Name']==n]
        if not f: row.append('-'); continue
        f=f[0]; p50=[v for kk,v in f['Extra'].items() if kk=='vmig latency p50 µs']
        row.append(f"{f['Ratio']['Median']:.3f}"+(f"/{p50[0]:.1f}" if p50 else ''))
    print(f"{n:80s} "+' '.join(f"{r:>12s}" for r in row))
