import json,sys,glob,re,statistics as st
# usage: dtagg.py dir prefix
d,pre=sys.argv[1],sys.argv[2]
steps=['downtime.pause-vcpus','downtime.device-stop-copy','downtime.dirty-collect','downtime.device-data','downtime.ram','downtime.vcpus','downtime.flush','downtime.target-ready','downtime.commit-round-trip']
for v in 'AB':
    meds=[];sums=[];allhops=[]
    for f in sorted(glob.glob(f"{d}/{pre}-{v}-*.json")):
        j=json.load(open(f))
        fig=[x for x in j['Figures'] if x['Name'].startswith('NVMe') and x['Name'].endswith('downtime')][0]
        meds.append(fig['Value']['Median'])
        ex=fig['Extra']
        sums.append(sum(vv for kk,vv in ex.items() if any(kk.startswith('step '+s+' ms (median') for s in steps)))
    print(f"{pre} {v}: run medians {[round(m,1) for m in meds]} -> median {st.median(meds):.1f} ms; sum of step medians {[round(s,2) for s in sums]} -> median {st.median(sums):.2f} ms")
