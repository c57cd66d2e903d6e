using System.Net;
using System.Net.Sockets;
using Vmig.Guest;
using Vmig.Guest.Workloads;
using Vmig.Vmm;
using Vmig.Vmm.Migration;

namespace Vmig.Vmm.Tests;

public sealed class WorkloadTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-fio-test").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void FioParser_AppliesGlobalDefaultsAndParsesTheSubset()
    {
        var jobs = FioJobParser.Parse("""
            ; comment
            [global]
            bs=8k
            iodepth=16
            verify=crc32c
            ioengine=libaio
            [randw]
            rw=randrw
            rwmixread=30
            size=64M
            numjobs=2
            runtime=1500ms
            io_size=1G
            time_based
            [seq]
            rw=read
            bs=4k
            size=0x100000
            runtime=2
            """);
        Assert.Equal(2, jobs.Count);
        var a = jobs[0];
        Assert.Equal(("randw", FioPattern.RandRw, 8192, 16, 64UL << 20, 2, 1500L, 1UL << 30, true, 30, true),
            (a.Name, a.Rw, a.BlockSize, a.IoDepth, a.Size, a.NumJobs, a.RuntimeMs, a.IoSize, a.Verify, a.RwMixRead, a.TimeBased));
        var b = jobs[1];
        Assert.Equal((FioPattern.Read, 4096, 16, 1UL << 20, 2000L, true), (b.Rw, b.BlockSize, b.IoDepth, b.Size, b.RuntimeMs, b.Verify));
    }

    [Theory]
    [InlineData("[j]\nrw=trim\nsize=1M", "line 2: rw")]
    [InlineData("[j]\nsize=1M\nfsync=1", "line 3: fsync: unsupported")]
    [InlineData("[j]\nsize=1M\nverify=md5", "only verify=crc32c")]
    [InlineData("[j]\nbs=4k\nsize=6k", "multiple of bs")]
    [InlineData("[j]\nsize=1M\niodepth=0", "outside [1, 256]")]
    [InlineData("bs=4k\n[j]", "line 1: option outside a section")]
    [InlineData("[global]\nbs=4k", "no job sections")]
    public void FioParser_RejectsWhatItDoesNotSupport(string text, string message)
    {
        var e = Assert.Throws<FormatException>(() => FioJobParser.Parse(text));
        Assert.Contains(message, e.Message, StringComparison.Ordinal);
    }

    private const string Job = """
        [w]
        rw=randrw
        rwmixread=25
        bs=4k
        iodepth=8
        size=2M
        io_size=8M
        verify=crc32c
        """;

    private (Vm Vm, FileBlockDevice Dev) FioVm(string file)
    {
        FileBlockDevice? dev = null;
        var vm = Vm.Create(new VmConfig
        {
            MemorySize = 8 << 20,
            Vcpus = [new VcpuConfig("fio", "device=blk0,gpa=0x100000\n" + Job)],
            Programs = new GuestProgramRegistry().Add(FioWorkload.Factory),
            SetupGuest = (env, _) => env.AddService("blk0", dev = new FileBlockDevice(file, env.Memory, 512, 8192, 0x80000)),
        });
        return (vm, dev!);
    }

    [Fact]
    public void Verifier_OnARealFile_CleanRunThenDetectsCorruptAndLostBlocks()
    {
        string file = Path.Combine(_dir, "ns.img");
        var (vm, dev) = FioVm(file);
        using (vm)
        using (dev)
        {
            vm.Start();
            TestVms.WaitUntil(() => vm.Vcpus[0].Finished, 30_000);
            vm.Pause();
            Assert.Null(vm.Vcpus[0].Fault);
            ulong state = FioWorkload.StateGpa(vm.Vcpus[0].Registers);
            var clean = FioWorkload.Verify(vm.Memory, state, dev);
            // 8 MiB of 4 KiB I/O, 75% writes: ~1536 writes, ~512 reads, over 512 blocks.
            Assert.Equal(2048, clean.Writes + clean.Reads);
            Assert.InRange(clean.Writes, 1200, 1900);
            Assert.True(clean.Clean, clean.ToString());
            Assert.InRange(clean.Verified, 400, 512);
            Assert.Equal(0, FioWorkload.Counters(vm.Memory, state).ReadMismatches);

            // Flip one payload byte of a written block: exactly one corrupt block.
            ulong block = Enumerable.Range(0, 512).Select(b => (ulong)b).First(b => vm.Memory.ReadUInt64(FioWorkload.LedgerEntryGpa(vm.Memory, state, b)) >> 32 != 0);
            using (var fs = new FileStream(file, FileMode.Open, FileAccess.ReadWrite))
            {
                fs.Position = (long)block * 4096 + 1000;
                int x = fs.ReadByte();
                fs.Position--;
                fs.WriteByte((byte)(x ^ 0x40));
            }
            var corrupt = FioWorkload.Verify(vm.Memory, state, dev);
            Assert.Equal((clean.Verified - 1, 0L, 1L), (corrupt.Verified, corrupt.Lost, corrupt.Corrupt));

            // A ledger that promises a newer generation than the (intact) block holds: an acknowledged write was lost.
            ulong other = Enumerable.Range(0, 512).Select(b => (ulong)b).First(b => b != block && vm.Memory.ReadUInt64(FioWorkload.LedgerEntryGpa(vm.Memory, state, b)) >> 32 != 0);
            ulong entryGpa = FioWorkload.LedgerEntryGpa(vm.Memory, state, other);
            vm.Memory.WriteUInt64(entryGpa, vm.Memory.ReadUInt64(entryGpa) + (1UL << 32) ^ 1);
            var lost = FioWorkload.Verify(vm.Memory, state, dev);
            Assert.Equal((clean.Verified - 2, 1L, 1L), (lost.Verified, lost.Lost, lost.Corrupt));
        }
    }

    [Fact]
    public void FioJob_RuntimeLimitsATimeBasedJob()
    {
        string file = Path.Combine(_dir, "t.img");
        FileBlockDevice? dev = null;
        using var vm = Vm.Create(new VmConfig
        {
            MemorySize = 8 << 20,
            Vcpus = [new VcpuConfig("fio", "device=b,gpa=0x100000\n[t]\nrw=write\nsize=1M\nruntime=300ms\ntime_based\nverify=crc32c")],
            Programs = new GuestProgramRegistry().Add(FioWorkload.Factory),
            SetupGuest = (env, _) => env.AddService("b", dev = new FileBlockDevice(file, env.Memory, 4096, 256, 0x80000)),
        });
        using var d = dev!;
        var sw = System.Diagnostics.Stopwatch.StartNew();
        vm.Start();
        TestVms.WaitUntil(() => vm.Vcpus[0].Finished, 20_000);
        Assert.True(sw.ElapsedMilliseconds >= 250, $"finished after {sw.ElapsedMilliseconds} ms");
        vm.Pause();
        var counts = FioWorkload.Verify(vm.Memory, FioWorkload.StateGpa(vm.Vcpus[0].Registers), d);
        Assert.True(counts.Writes > 256 && counts.Clean, counts.ToString()); // wrapped around the 1 MiB region at least once
    }

    [Fact]
    public async Task FioWithVerifier_MigratedTwice_ContinuesWithNoLostOrCorruptWrites()
    {
        string file = Path.Combine(_dir, "shared.img"); // both "hosts" see the same file, as with shared storage
        var devices = new List<FileBlockDevice>();
        VmConfig Config() => new()
        {
            MemorySize = 16 << 20,
            Vcpus = [new VcpuConfig("fio", "device=blk0,gpa=0x100000\n[w]\nrw=randrw\nrwmixread=30\nbs=4k\niodepth=8\nsize=2M\nruntime=60s\ntime_based\nverify=crc32c")],
            Programs = new GuestProgramRegistry().Add(FioWorkload.Factory),
            SetupGuest = (env, resumed) =>
            {
                var d = new FileBlockDevice(file, env.Memory, 512, 8192, 0x80000, attach: resumed);
                lock (devices)
                {
                    devices.Add(d);
                }
                env.AddService("blk0", d);
            },
        };
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var vm = Vm.Create(Config());
        try
        {
            vm.Start();
            TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 50);
            MigrationReport? report = null;
            for (int hop = 0; hop < 2; hop++)
            {
                var target = MigrationTarget.AcceptAsync(listener, Config(), d => throw new InvalidOperationException());
                report = await MigrationSource.RunAsync(vm, listener.LocalEndpoint, new MigrationOptions { MaxRounds = 5 });
                var next = await target;
                long before = FioWorkload.Counters(vm.Memory, FioWorkload.StateGpa(vm.Vcpus[0].Registers)).Writes;
                vm.Dispose();
                vm = next;
                TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 50);
                vm.Pause();
                Assert.Null(vm.Vcpus[0].Fault);
                long after = FioWorkload.Counters(vm.Memory, FioWorkload.StateGpa(vm.Vcpus[0].Registers)).Writes;
                Assert.True(after > before, $"hop {hop}: writes {before} -> {after}");
                vm.Resume();
            }
            vm.Pause();
            ulong state = FioWorkload.StateGpa(vm.Vcpus[0].Registers);
            var counts = FioWorkload.Verify(vm.Memory, state, devices[^1]);
            Assert.True(counts.Clean && counts.Verified > 100, counts.ToString());
            Assert.Equal(0, FioWorkload.Counters(vm.Memory, state).ReadMismatches);
            report!.Verifier = counts;
            Assert.Contains("\"Corrupt\": 0", report.ToJson(), StringComparison.Ordinal);
        }
        finally
        {
            vm.Dispose();
            foreach (var d in devices)
            {
                d.Dispose();
            }
        }
    }
}
