#!/bin/bash
# usage: ab.sh TAG PAIRS SCENARIO RUNS
out=/work/wt/s4-nvme/bench/results/s4-nvme
A=/tmp/s4nvme-base/bench/Vmig.Bench/bin/Release/net10.0
B=/work/wt/s4-nvme/bench/Vmig.Bench/bin/Release/net10.0
for i in $(seq 1 $2); do
  for v in B A; do
    d=$A; [ $v = B ] && d=$B
    f=$out/$1-$v-$i.txt
    uptime > $f
    (cd $d && timeout 600 dotnet Vmig.Bench.dll --runs $4 --json $out/$1-$v-$i.json $3 >> $f 2>&1)
    uptime >> $f
  done
done
