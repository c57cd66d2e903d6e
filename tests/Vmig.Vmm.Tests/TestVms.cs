using System.Diagnostics;
using Vmig.Devices.Accelerator;
using Vmig.Guest;
using Vmig.Guest.Workloads;
using Vmig.VfioUser.Server;
using Vmig.Vmm;

namespace Vmig.Vmm.Tests;

internal static class TestVms
{
    public const ulong MiB = 1 << 20;

    public static GuestProgramRegistry Registry() => new GuestProgramRegistry().Add(MemoryDirtier.Factory);

    public static Vm Dirtier(ulong ramMiB, string region, IReadOnlyList<IVmDevice>? devices = null) =>
        Vm.Create(new VmConfig
        {
            Name = "test",
            MemorySize = ramMiB * MiB,
            Vcpus = [new VcpuConfig("memory-dirtier", region)],
            Programs = Registry(),
        }, devices);

    public static void WaitUntil(Func<bool> condition, int timeoutMs = 10_000)
    {
        var sw = Stopwatch.StartNew();
        while (!condition())
        {
            if (sw.ElapsedMilliseconds > timeoutMs)
            {
                throw new TimeoutException("condition not reached");
            }
            Thread.Sleep(5);
        }
    }

    /// <summary>Pauses, checks the dirtier's RAM against its registers, returns bytes written.</summary>
    public static ulong PauseAndVerify(Vm vm)
    {
        vm.Pause();
        byte[] regs = vm.Vcpus[0].Registers;
        Assert.Equal(0, MemoryDirtier.Verify(vm.Memory, regs));
        Assert.Null(vm.Vcpus[0].Fault);
        return MemoryDirtier.BytesWritten(regs);
    }

    /// <summary>One accelerator "host": a PF with 1 MiB of device memory per VF, VF 0 served over vfio-user at <paramref name="socket"/>.</summary>
    public static AcceleratorHost Accelerator(string socket)
    {
        var pf = new AcceleratorPf(2, AcceleratorProfile.Create(1 << 20, 64));
        pf.EnableVfs(1);
        var server = new VfioUserServer(pf.GetVf(0), socket);
        server.Start();
        return new AcceleratorHost(pf, server);
    }
}

internal sealed record AcceleratorHost(AcceleratorPf Pf, VfioUserServer Server) : IDisposable
{
    public string SocketPath => Server.SocketPath;

    public void Dispose()
    {
        Server.Dispose();
        Pf.Dispose();
    }
}
