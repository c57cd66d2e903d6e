using System.Text.Json;
using Microsoft.Extensions.Logging;
using Vmig.Devices.Nvme;
using Vmig.Devices.Pci;
using Vmig.VfioUser.Server;

namespace Vmig.RealguestHost;

/// <summary>
/// Stand-in for `vmig host --config FILE` (realguest suite, until the real one serves NVMe): reads the JSON that
/// tests/realguest/run.sh writes (runDir, subsystems[0].namespaces[0].file/lbaSize, secondaryControllers,
/// pfSocket), builds an <see cref="NvmeSubsystem"/>, provisions and onlines secondary controller 1, attaches
/// namespace 1 to it, and serves the PF on runDir/pfSocket and VF n on runDir/nvme0-vf{n}.sock until SIGTERM.
/// </summary>
internal static class Program
{
    private static int Main(string[] args)
    {
        if (args.Length != 3 || args[0] != "host" || args[1] != "--config")
        {
            Console.Error.WriteLine("usage: Vmig.RealguestHost host --config FILE.json");
            return 2;
        }
        using var loggers = LoggerFactory.Create(b => b.AddSimpleConsole(o => o.SingleLine = true).SetMinimumLevel(LogLevel.Debug));
        var log = loggers.CreateLogger("realguest-host");
        using var doc = JsonDocument.Parse(File.ReadAllText(args[2]));
        var root = doc.RootElement;
        string runDir = root.GetProperty("runDir").GetString()!;
        var sub = root.GetProperty("subsystems")[0];
        var ns = sub.GetProperty("namespaces")[0];
        int vfs = sub.GetProperty("secondaryControllers").GetInt32();
        string pfSocket = Path.Combine(runDir, sub.GetProperty("pfSocket").GetString()!);

        var defaults = new NvmeSubsystemOptions();
        using var subsystem = new NvmeSubsystem(defaults with
        {
            SerialNumber = sub.GetProperty("serial").GetString()!,
            Subnqn = sub.GetProperty("nqn").GetString()!,
            // Optional overrides: the defaults 1B36:0010/0011 are QEMU's NVMe (Linux applies its quirks) and
            // QEMU's pvpanic-pci (Linux binds pvpanic-pci to the VF, not nvme).
            DeviceId = sub.TryGetProperty("pfDeviceId", out var pd) ? Convert.ToUInt16(pd.GetString(), 16) : defaults.DeviceId,
            VfDeviceId = sub.TryGetProperty("vfDeviceId", out var vd) ? Convert.ToUInt16(vd.GetString(), 16) : defaults.VfDeviceId,
        });
        uint nsid = subsystem.AddNamespace(ns.GetProperty("file").GetString()!, ns.GetProperty("lbaSize").GetInt32(), ns.GetProperty("nsid").GetUInt32());
        subsystem.SetEnabledVfs(vfs);
        var servers = new List<VfioUserServer>();
        var functions = new List<NvmeFunction>();
        var opts = subsystem.Options;
        log.LogInformation("PCI ids: PF {Vendor:x4}:{Pf:x4}, VF {Vendor:x4}:{Vf:x4}", opts.VendorId, opts.DeviceId, opts.VendorId, opts.VfDeviceId);
        var pf = new NvmeFunction(subsystem.Primary, opts.VendorId, opts.DeviceId);
        functions.Add(pf);
        servers.Add(new VfioUserServer(pf, pfSocket, loggers: loggers));
        var vfCntlids = new List<ushort>();
        for (int i = 0; i < vfs; i++)
        {
            var ctrl = subsystem.Secondaries[i];
            subsystem.ProvisionSecondary(ctrl.Cntlid, queues: 5, vectors: 5);
            vfCntlids.Add(ctrl.Cntlid);
            var vf = new NvmeFunction(ctrl, opts.VendorId, opts.VfDeviceId);
            functions.Add(vf);
            servers.Add(new VfioUserServer(vf, Path.Combine(runDir, $"nvme0-vf{i}.sock"), loggers: loggers));
        }
        var st = subsystem.AttachNamespace(nsid, vfCntlids);
        log.LogInformation("namespace {Nsid} attached to {Cntlids}: {Status}", nsid, string.Join(",", vfCntlids), st);
        foreach (var s in servers)
        {
            if (File.Exists(s.SocketPath))
            {
                File.Delete(s.SocketPath);
            }
            s.Start();
            log.LogInformation("listening on {Socket}", s.SocketPath);
        }
        using var stop = new ManualResetEventSlim();
        using var reg = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, c =>
        {
            c.Cancel = true;
            stop.Set();
        });
        stop.Wait();
        log.LogInformation("SIGTERM: stopping");
        foreach (var s in servers)
        {
            s.Dispose();
        }
        return 0;
    }
}

/// <summary>
/// An NVMe controller as a PCIe function: class 0x010802, BAR0 (64-bit, <see cref="NvmeController.Bar0Size"/>)
/// forwards to the controller's registers and doorbells, MSI-X (9 vectors) in BAR4 (table at 0, PBA at 0x1000).
/// FLR resets the controller.
/// </summary>
internal sealed class NvmeFunction(NvmeController controller, ushort vendorId, ushort deviceId) : PciFunction(new PciFunctionDeclaration
{
    VendorId = vendorId,
    DeviceId = deviceId,
    SubsystemVendorId = vendorId,
    SubsystemId = deviceId,
    ClassCode = 0x010802,
    Bars = [new PciBar(NvmeController.Bar0Size, Is64Bit: true), null, null, null, new PciBar(0x2000), null],
    Msix = new PciMsixLayout(9, 4, 0, 4, 0x1000),
})
{
    protected override int ReadBar(int bar, ulong offset, Span<byte> data) =>
        bar == 0 ? controller.ReadBar0((long)offset, data) : base.ReadBar(bar, offset, data);

    protected override int WriteBar(int bar, ulong offset, ReadOnlySpan<byte> data) =>
        bar == 0 ? controller.WriteBar0((long)offset, data) : base.WriteBar(bar, offset, data);

    protected override void OnFunctionReset() => controller.Reset();

    /// <summary>
    /// RG_MSIX_VIA_SET_IRQS=1: raise the vector straight through the client's SET_IRQS eventfd. With QEMU's
    /// vfio-user-pci the MSI-X table lives in QEMU (as with kernel vfio-pci): the guest's table writes never reach
    /// the server, so the device-side table keeps its reset state (every vector masked) and
    /// <see cref="PciFunction.SignalMsix"/> only ever sets PBA bits. This switch exists to show that diagnosis and
    /// to let the rest of the suite run; it is not a fix.
    /// </summary>
    private static readonly bool MsixViaSetIrqs = Environment.GetEnvironmentVariable("RG_MSIX_VIA_SET_IRQS") == "1";

    public override void OnAttached(DeviceContext context)
    {
        base.OnAttached(context);
        controller.Attach(BusMasterDma, v =>
        {
            if (!SignalMsix(v) && MsixViaSetIrqs && IsMsixEnabled)
            {
                Context?.Irqs.Trigger(Vmig.VfioUser.Protocol.VfioPci.MsixIrqIndex, v);
            }
        });
    }

    public override void OnDetached()
    {
        controller.Detach();
        base.OnDetached();
    }
}
