using System.Net;
using System.Net.Sockets;
using Vmig.Devices.Nvme;
using Vmig.Guest;
using Vmig.Guest.Workloads;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser.Server;
using Vmig.Vmm;
using Vmig.Vmm.Migration;

namespace Vmig.Vmm.Tests;

/// <summary>
/// An NVMe secondary controller attached to a VM in-process (BAR0 straight to the controller, DMA through a
/// DmaSpace over the RAM memfd, MSI-X through the VM's eventfds). No migration: it exercises the VM, the guest
/// NVMe driver setup and the fio workload + verifier on a real emulated controller and namespace file.
/// </summary>
internal sealed class InProcessNvmeDevice(NvmeController controller, string name, int vectors) : IVmDevice
{
    private readonly byte[] _config = new byte[4096];
    private readonly DmaSpace _dma = new();

    public DeviceDescription Description { get; } = new(name, "nvme", "in-process", MigrationFlags.None);
    public bool SupportsPrecopyInfo => false;
    public bool SupportsStopCopySize => false;
    public bool SupportsDirtyLogging => false;
    public int MsixVectorCount => vectors;

    public void ReadRegion(int index, ulong offset, Span<byte> data)
    {
        if (index == 7)
        {
            _config.AsSpan((int)offset, data.Length).CopyTo(data);
        }
        else if (controller.ReadBar0((long)offset, data) != 0)
        {
            throw new IOException($"BAR{index} read at {offset:x} failed");
        }
    }

    public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        if (index == 7)
        {
            data.CopyTo(_config.AsSpan((int)offset));
        }
        else if (controller.WriteBar0((long)offset, data) != 0)
        {
            throw new IOException($"BAR{index} write at {offset:x} failed");
        }
    }

    public void DmaMap(ulong iova, ulong size, UnixFd fd, long fileOffset) =>
        Assert.Equal(0, _dma.Map(iova, size, DmaProt.Read | DmaProt.Write, Mapping.Map(fd, fileOffset, (long)size)));

    public void DmaUnmap(ulong iova, ulong size) => _dma.Unmap(iova, size);

    public void SetMsixEventFds(IReadOnlyList<EventFd> fds) => controller.Attach(_dma, v =>
    {
        if (v < fds.Count)
        {
            fds[v].Signal();
        }
    });

    public DeviceState GetState() => DeviceState.Running;
    public DeviceState SetState(DeviceState target) => throw new NotSupportedException();
    public int ReadMigrationData(Span<byte> buffer) => throw new NotSupportedException();
    public void WriteMigrationData(ReadOnlySpan<byte> data) => throw new NotSupportedException();
    public PrecopyInfo GetPrecopyInfo() => throw new NotSupportedException();
    public ulong GetStopCopySize() => throw new NotSupportedException();
    public void StartDirtyLogging(ulong pageSize, IReadOnlyList<(ulong Iova, ulong Length)> ranges) => throw new NotSupportedException();
    public void StopDirtyLogging() => throw new NotSupportedException();
    public void ReportDirty(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap) => throw new NotSupportedException();
    public void Reset() => throw new NotSupportedException();

    public void Dispose()
    {
        controller.Detach();
        _dma.Dispose();
    }
}

public sealed class NvmeGuestTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-vmm-nvme").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void FioOnTheGuestNvmeDriver_VerifiesCleanAndDetectsACorruptedNamespaceBlock()
    {
        string ns = Path.Combine(_dir, "ns1.img");
        using (var f = File.Create(ns))
        {
            f.SetLength(8 << 20);
        }
        using var sub = new NvmeSubsystem(new NvmeSubsystemOptions { MaxSecondaryControllers = 2 });
        uint nsid = sub.AddNamespace(ns, 512);
        sub.EnableVfs(sub.Secondaries.Count);
        sub.ProvisionSecondary(1, 5, 5);
        Assert.True(sub.AttachNamespace(nsid, [1]).IsSuccess);

        using var vm = Vm.Create(new VmConfig
        {
            MemorySize = 16 << 20,
            Vcpus = [new VcpuConfig("fio", "device=nvme0-q1,gpa=0x800000\n[r]\nrw=randwrite\nbs=4k\niodepth=16\nsize=2M\nio_size=6M\nverify=crc32c")],
            Programs = new GuestProgramRegistry().Add(FioWorkload.Factory),
            SetupGuest = GuestSetup.Nvme("nvme0", "nvme0", 0x200000, 0x400000, nsid, ioQueues: 2),
        }, [new InProcessNvmeDevice(sub.GetSecondary(1)!, "nvme0", 5)]);
        vm.Start();
        TestVms.WaitUntil(() => vm.Vcpus[0].Finished, 30_000);
        vm.Pause();
        Assert.Null(vm.Vcpus[0].Fault);
        var block = vm.Guest.GetService<IGuestBlockDevice>("nvme0-q1");
        Assert.Equal(512, block.BlockSize);
        ulong state = FioWorkload.StateGpa(vm.Vcpus[0].Registers);
        var clean = FioWorkload.Verify(vm.Memory, state, block);
        Assert.Equal(1536, clean.Writes); // 6 MiB / 4 KiB
        Assert.True(clean.Clean && clean.Verified > 400, clean.ToString());

        ulong written = Enumerable.Range(0, 512).Select(b => (ulong)b).First(b => vm.Memory.ReadUInt64(FioWorkload.LedgerEntryGpa(vm.Memory, state, b)) >> 32 != 0);
        using (var fs = new FileStream(ns, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
        {
            fs.Position = (long)written * 4096 + 2000;
            int x = fs.ReadByte();
            fs.Position--;
            fs.WriteByte((byte)(x ^ 1));
        }
        var bad = FioWorkload.Verify(vm.Memory, state, block);
        Assert.Equal((clean.Verified - 1, 1L), (bad.Verified, bad.Corrupt));

        // This in-process device has no migration support: the source refuses before connecting anywhere.
        var e = Assert.Throws<AggregateException>(() => Vmig.Vmm.Migration.MigrationSource.RunAsync(vm, new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, 9)).Wait());
        var me = Assert.IsType<Vmig.Vmm.Migration.VmMigrationException>(e.InnerException);
        Assert.Equal("not-started", me.Report.Outcome);
        Assert.Contains("not migratable", me.Report.Error, StringComparison.Ordinal);
    }

    /// <summary>One "host": a subsystem on the shared namespace file with VF 0 (CNTLID 1) served over vfio-user.</summary>
    private static (NvmeSubsystem Sub, VfioUserServer Server, uint Nsid) Host(string ns, string socket)
    {
        var sub = new NvmeSubsystem(new NvmeSubsystemOptions { MaxSecondaryControllers = 2 });
        uint nsid = sub.AddNamespace(ns, 512);
        Assert.True(sub.AttachNamespace(nsid, [1]).IsSuccess);
        sub.ProvisionSecondary(1, 3, 3);
        sub.EnableVfs(1);
        var server = new VfioUserServer(sub.GetVfFunction(0)!, socket);
        server.Start();
        return (sub, server, nsid);
    }

    [Fact]
    public async Task NvmeAndAcceleratorVfsOverVfioUser_FioAndJobMix_MigratedThereAndBack_NoLostOrCorruptWrites()
    {
        string ns = Path.Combine(_dir, "shared.img"); // shared storage: both hosts serve the same file
        using (var f = File.Create(ns))
        {
            f.SetLength(8 << 20);
        }
        var (subA, serverA, nsid) = Host(ns, Path.Combine(_dir, "a.sock"));
        var (subB, serverB, _) = Host(ns, Path.Combine(_dir, "b.sock"));
        using var accelA = TestVms.Accelerator(Path.Combine(_dir, "aa.sock"));
        using var accelB = TestVms.Accelerator(Path.Combine(_dir, "ab.sock"));
        using var la = new TcpListener(IPAddress.Loopback, 0);
        using var lb = new TcpListener(IPAddress.Loopback, 0);
        la.Start();
        lb.Start();
        VmConfig Config(bool boot) => new()
        {
            Name = "nvme-vm",
            MemorySize = 16 << 20,
            Vcpus = boot
                ? [new VcpuConfig("fio", "device=nvme0-q1,gpa=0x800000\n[w]\nrw=randrw\nrwmixread=30\nbs=4k\niodepth=16\nsize=2M\nruntime=60s\ntime_based\nverify=crc32c"),
                   new VcpuConfig("accel-mix", "device=accel0,gpa=0xD00000,len=4096,regions=16")]
                : [],
            Programs = new GuestProgramRegistry().Add(FioWorkload.Factory).Add(AcceleratorJobMix.Factory),
            SetupGuest = GuestSetup.Combine(
                GuestSetup.Nvme("nvme0", "nvme0", 0x200000, 0x400000, nsid, ioQueues: 2),
                GuestSetup.Accelerator("accel0", "accel0", 0xC00000)),
        };
        IVmDevice Open(DeviceDescription d, string nvmeSock, string accelSock) => d.Kind == "nvme"
            ? VfioUserVmDevice.Connect(nvmeSock, d.Name, "nvme", "q=2")
            : VfioUserVmDevice.Connect(accelSock, d.Name, "accel", "mem=1M");
        var vm = Vm.Create(Config(true),
            [VfioUserVmDevice.Connect(serverA.SocketPath, "nvme0", "nvme", "q=2"), VfioUserVmDevice.Connect(accelA.SocketPath, "accel0", "accel", "mem=1M")]);
        try
        {
            vm.Start();
            TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 50);
            (string Nvme, string Accel, TcpListener L)[] hops = [(serverB.SocketPath, accelB.SocketPath, lb), (serverA.SocketPath, accelA.SocketPath, la)];
            foreach (var (nvmeSock, accelSock, l) in hops)
            {
                var target = MigrationTarget.AcceptAsync(l, Config(false), d => Open(d, nvmeSock, accelSock));
                var report = await MigrationSource.RunAsync(vm, l.LocalEndpoint, new MigrationOptions { MaxRounds = 5 });
                Assert.Equal("completed", report.Outcome);
                var next = await target;
                long before = FioWorkload.Counters(vm.Memory, FioWorkload.StateGpa(vm.Vcpus[0].Registers)).Writes;
                ulong jobsBefore = AcceleratorJobMix.Counters(vm.Vcpus[1].Registers).Iterations;
                vm.Dispose();
                vm = next;
                TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 50 && vm.Vcpus[1].Slices > 200);
                vm.Pause();
                Assert.Null(vm.Vcpus[0].Fault);
                long after = FioWorkload.Counters(vm.Memory, FioWorkload.StateGpa(vm.Vcpus[0].Registers)).Writes;
                Assert.True(after > before, $"writes {before} -> {after}");
                Assert.Null(vm.Vcpus[1].Fault);
                var jobs = AcceleratorJobMix.Counters(vm.Vcpus[1].Registers);
                Assert.Equal(0UL, jobs.Bad);
                Assert.True(jobs.Iterations > jobsBefore, $"accelerator iterations {jobsBefore} -> {jobs.Iterations}");
                vm.Resume();
            }
            vm.Pause();
            ulong state = FioWorkload.StateGpa(vm.Vcpus[0].Registers);
            var counts = FioWorkload.Verify(vm.Memory, state, vm.Guest.GetService<IGuestBlockDevice>("nvme0-q1"));
            Assert.True(counts.Clean && counts.Verified > 100, counts.ToString());
            Assert.Equal(0, FioWorkload.Counters(vm.Memory, state).ReadMismatches);
        }
        finally
        {
            vm.Dispose();
            serverA.Dispose();
            serverB.Dispose();
            subA.Dispose();
            subB.Dispose();
        }
    }
}
