using System.Net;
using System.Net.Sockets;
using Vmig.Guest;
using Vmig.Guest.Workloads;
using Vmig.Vmm;
using Vmig.Vmm.Migration;

namespace Vmig.Vmm.Tests;

/// <summary>A VM whose accelerator VF is served over a real vfio-user socket, migrated between two "hosts".</summary>
public sealed class RealDeviceTests : IDisposable
{
    private const string Profile = "accel mem=1M ring=64";
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-vmm-rd").FullName;
    private readonly TcpListener _listenerA = new(IPAddress.Loopback, 0);
    private readonly TcpListener _listenerB = new(IPAddress.Loopback, 0);

    public RealDeviceTests()
    {
        _listenerA.Start();
        _listenerB.Start();
    }

    public void Dispose()
    {
        _listenerA.Dispose();
        _listenerB.Dispose();
        Directory.Delete(_dir, true);
    }

    private static VmConfig Guest(string args = "") => new()
    {
        Name = "accel-vm",
        MemorySize = 8 << 20,
        Vcpus = args.Length == 0 ? [] : [new VcpuConfig("accel-mix", args)],
        Programs = new GuestProgramRegistry().Add(AcceleratorJobMix.Factory).Add(MemoryDirtier.Factory),
        SetupGuest = GuestSetup.Accelerator("accel0", "accel0", 0x100000),
    };

    private static (ulong Iterations, ulong Ok, ulong Bad) PauseAndCount(Vm vm)
    {
        vm.Pause();
        Assert.Null(vm.Vcpus[0].Fault);
        return AcceleratorJobMix.Counters(vm.Vcpus[0].Registers);
    }

    [Fact]
    public async Task AcceleratorVfOverVfioUser_MigratesThereAndBack_JobsContinueWithoutErrors()
    {
        using var serverA = TestVms.Accelerator(Path.Combine(_dir, "a.sock"));
        using var serverB = TestVms.Accelerator(Path.Combine(_dir, "b.sock"));

        var vm = Vm.Create(Guest("device=accel0,gpa=0x300000,len=4096,regions=16"),
            [VfioUserVmDevice.Connect(serverA.SocketPath, "accel0", "accel", Profile)]);
        try
        {
            vm.Start();
            TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 200);
            string[] sockets = [serverB.SocketPath, serverA.SocketPath];
            TcpListener[] listeners = [_listenerB, _listenerA];
            ulong lastOk = 0;
            for (int hop = 0; hop < 2; hop++)
            {
                string sock = sockets[hop];
                var target = MigrationTarget.AcceptAsync(listeners[hop], Guest(), d => VfioUserVmDevice.Connect(sock, d.Name, "accel", Profile));
                var report = await MigrationSource.RunAsync(vm, listeners[hop].LocalEndpoint, new MigrationOptions { MaxRounds = 4 });
                Assert.Equal("completed", report.Outcome);
                Assert.True(report.BytesBySection.ContainsKey("DeviceData"), report.ToJson());
                Assert.True(report.DeviceDataConnection, "device data should have gone on its own connection (2.2 target)");
                var next = await target;
                var before = AcceleratorJobMix.Counters(vm.Vcpus[0].Registers);
                vm.Dispose(); // the source releases its VF; that host's server takes the next client
                vm = next;
                TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 200);
                var after = PauseAndCount(vm);
                Assert.Equal(0UL, after.Bad);
                Assert.True(after.Iterations > before.Iterations + 3, $"hop {hop}: {before} -> {after}");
                Assert.True(after.Ok > lastOk);
                lastOk = after.Ok;
                vm.Resume();
            }
        }
        finally
        {
            vm.Dispose();
        }
    }
}
