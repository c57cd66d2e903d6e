import json,sys,glob,re,statistics as st
rows={}
for f in sorted(glob.glob(sys.argv[1])):
    d=json.load(open(f))
    fig=[x for x in d['Figures'] if x['Name'].startswith('NVMe') and x['Name'].endswith('downtime')][0]
    txt=open(f.replace('.json','.txt')).read()
    load=re.search(r'load average: ([\d.]+)',txt).group(1)
    ex=fig['Extra']
    keys=['step downtime.pause-vcpus','step downtime.device-stop-copy','step downtime.dirty-collect','step downtime.ram','step downtime.device-data','step downtime.target-ready','step downtime.commit-round-trip','step target device-load','step target device-run','step target guest-resume']
    vals=[]
    for k in keys:
        m=[v for kk,v in ex.items() if kk.startswith(k+' ms (median')]
        vals.append(m[0] if m else float('nan'))
    print(f"{f.split('/')[-1]:16s} load {load:>5s} med {fig['Value']['Median']:6.2f} q1 {fig['Value']['Q1']:6.2f} q3 {fig['Value']['Q3']:6.2f} max {fig['Value']['Max']:6.1f} | "+' '.join(f"{v:5.2f}" for v in vals))
print("cols: pause stopcopy dirty ram devdata target-ready commit-rt | target: device-load device-run guest-resume (medians over hops)")
