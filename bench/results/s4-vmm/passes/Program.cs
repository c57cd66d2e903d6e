// Source-side RAM passes: CPU (this thread) of VmSnapshot.Save of a 1 GiB populated idle VM into Stream.Null
// (the same StateSender/RAM path as a live migration's round 1, without a socket), min and median of N.
using System.Diagnostics;
using Vmig.Guest;
using Vmig.Vmm;
using Vmig.Vmm.Migration;
int n = int.Parse(args[0]);
if (args[1] == "target") { Target.Run(n); return; }
var vm = Vm.Create(new VmConfig { Name = "p", MemorySize = 1UL << 30, Programs = new GuestProgramRegistry() });
for (long off = 0; off < (1L << 30); off += 1 << 20) vm.Memory.GetHostSpan((ulong)off, 1 << 20).Fill((byte)(1 + (off >> 20) % 255));
var cpu = new List<double>(); var wall = new List<double>();
for (int i = 0; i < n; i++)
{
    double c0 = ThreadCpu.Milliseconds(); var sw = Stopwatch.StartNew();
    VmSnapshot.Save(vm, Stream.Null);
    wall.Add(sw.Elapsed.TotalMilliseconds); cpu.Add(ThreadCpu.Milliseconds() - c0);
}
cpu.Sort(); wall.Sort();
Console.WriteLine($"{args[1]}: snapshot of 1 GiB to Stream.Null, thread CPU ms min {cpu[0]} median {cpu[n / 2]}; wall ms min {wall[0]:F0} median {wall[n / 2]:F0} (n={n})");

static class Target
{
    // Target-side candidates per GiB, thread CPU ms (min of n): each on fresh RAM, 1 MiB chunks from a hot buffer.
    public static void Run(int n)
    {
        const int MiB = 1 << 20; const ulong GiB = 1UL << 30;
        var buf = new byte[MiB]; new Random(1).NextBytes(buf);
        var res = new Dictionary<string, List<double>>();
        void M(string name, Action a) { double c0 = ThreadCpu.Milliseconds(); a(); (res.TryGetValue(name, out var l) ? l : res[name] = []).Add(ThreadCpu.Milliseconds() - c0); }
        for (int i = 0; i < n; i++)
        {
            M("CRC-32C of the received 1 MiB payload (hot), per GiB", () => { uint c = 0; for (int k = 0; k < 1024; k++) c ^= Vmig.Spec.Crc32C.Compute(buf); GC.KeepAlive(c); });
            using (var r = GuestRam.Create(GiB, "fresh"))
                M("pwrite into fresh memfd (default target load)", () => { for (ulong o = 0; o < GiB; o += MiB) r.LoadUntracked(o, buf); });
            GuestRam? p = null;
            M("prefault 1 GiB (MAP_POPULATE; before the migration)", () => p = GuestRam.Create(GiB, "pre", prefault: true));
            M("copy into prefaulted RAM (preallocated target load)", () => { for (ulong o = 0; o < GiB; o += MiB) p!.LoadUntracked(o, buf); });
            p!.Dispose();
            using (var q = GuestRam.Create(GiB, "pre2", prefault: true))
                M("CRC fused with the copy into prefaulted RAM (not done: evaluated)", () => { uint c = Vmig.Spec.Crc32C.Start; for (ulong o = 0; o < GiB; o += MiB) c = Vmig.Spec.Crc32C.AppendCopy(c, buf, q.GetHostSpan(o, MiB)); GC.KeepAlive(c); });
        }
        foreach (var (k, v) in res) { v.Sort(); Console.WriteLine($"target: {k}: CPU ms min {v[0]} median {v[v.Count / 2]} (n={v.Count})"); }
    }
}
