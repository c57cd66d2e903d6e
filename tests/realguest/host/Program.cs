using System.Text.Json;
using Microsoft.Extensions.Logging;
using Vmig.Devices.Nvme;
using Vmig.Devices.Pci;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.RealguestHost;

/// <summary>
/// Stand-in for `vmig host --config FILE` (realguest suite, until the real one serves NVMe): reads the JSON that
/// tests/realguest/run.sh writes for `vmig host` (runtimeDir, nvme[0].name/namespaces[0].path+lbaSize/vfs/
/// queuesPerVf/vectorsPerVf, plus optional pfDeviceId/vfDeviceId hex), builds an <see cref="NvmeSubsystem"/>, enables the VFs through
/// the PF's SR-IOV capability, provisions and onlines each secondary controller, attaches namespace 1 to the
/// secondaries, and serves the project's own <see cref="NvmeFunction"/>s — the PF on runtimeDir/NAME-pf.sock, VF n
/// on runtimeDir/NAME-vf{n}.sock — until SIGTERM. It adds no device behaviour (except the RG_MSIX_UNMASK diagnosis aid).
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
        string runDir = root.GetProperty("runtimeDir").GetString()!;
        var sub = root.GetProperty("nvme")[0];
        string name = sub.GetProperty("name").GetString()!;
        var ns = sub.GetProperty("namespaces")[0];
        int vfs = sub.GetProperty("vfs").GetInt32();
        ushort queues = (ushort)(sub.GetProperty("queuesPerVf").GetInt32() + 1);
        ushort vectors = (ushort)sub.GetProperty("vectorsPerVf").GetInt32();
        string pfSocket = Path.Combine(runDir, name + "-pf.sock");

        var defaults = new NvmeSubsystemOptions();
        using var subsystem = new NvmeSubsystem(defaults with
        {
            SerialNumber = $"VMIG-{name}",
            Subnqn = $"nqn.2026-11.io.vmig:nvme:{name}",
            // Optional overrides: the defaults 1B36:0010/0011 are QEMU's NVMe (Linux applies its quirks) and
            // QEMU's pvpanic-pci (Linux binds pvpanic-pci to the VF, not nvme).
            DeviceId = sub.TryGetProperty("pfDeviceId", out var pd) ? Convert.ToUInt16(pd.GetString(), 16) : defaults.DeviceId,
            VfDeviceId = sub.TryGetProperty("vfDeviceId", out var vd) ? Convert.ToUInt16(vd.GetString(), 16) : defaults.VfDeviceId,
        });
        uint nsid = subsystem.AddNamespace(ns.GetProperty("path").GetString()!, ns.GetProperty("lbaSize").GetInt32());
        var opts = subsystem.Options;
        log.LogInformation("PCI ids: PF {Vendor:x4}:{Pf:x4}, VF {Vendor:x4}:{Vf:x4}", opts.VendorId, opts.DeviceId, opts.VendorId, opts.VfDeviceId);
        // What a host PF driver does: VF Enable through the PF's SR-IOV capability, then VQ/VI resources and Online.
        subsystem.EnableVfs(vfs);
        bool unmask = Environment.GetEnvironmentVariable("RG_MSIX_UNMASK") == "1";
        var servers = new List<VfioUserServer>
        {
            new(Wrap(subsystem.PrimaryFunction, unmask), pfSocket, loggers: loggers),
        };
        var vfCntlids = new List<ushort>();
        for (int i = 0; i < vfs; i++)
        {
            var fn = subsystem.GetVfFunction(i) ?? throw new InvalidOperationException($"VF {i} not enabled");
            subsystem.ProvisionSecondary(fn.Controller.Cntlid, queues, vectors);
            vfCntlids.Add(fn.Controller.Cntlid);
            servers.Add(new VfioUserServer(Wrap(fn, unmask), Path.Combine(runDir, $"{name}-vf{i}.sock"), loggers: loggers));
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

    private static VfioUserDevice Wrap(NvmeFunction fn, bool unmask) => unmask ? new MsixUnmaskingDevice(fn) : fn;
}

/// <summary>
/// RG_MSIX_UNMASK=1 only, a diagnosis aid, not a fix: with QEMU's vfio-user-pci the MSI-X table lives in QEMU (as with
/// kernel vfio-pci), so the guest's table writes never reach the server. The device-side table keeps its reset state
/// (every vector masked, PCI Local Bus 6.0 §6.8.2.9) and <see cref="PciFunction.SignalMsix"/> only sets PBA bits:
/// Linux's admin commands time out ("I/O n QID 0 timeout, completion polled"). This decorator clears the device-side
/// Vector Control mask bits after attach, reset and config writes, i.e. trusts the client's SET_IRQS arming, so the
/// rest of the suite can run against the project's NvmeFunction.
/// </summary>
internal sealed class MsixUnmaskingDevice(NvmeFunction inner) : VfioUserDevice
{
    public override DeviceInfoFlags InfoFlags => inner.InfoFlags;
    public override IReadOnlyList<RegionDescriptor> Regions => inner.Regions;
    public override IReadOnlyList<IrqDescriptor> Irqs => inner.Irqs;
    public override Vmig.Migration.IMigrationDevice? Migration => inner.Migration;

    public override int ReadRegion(int index, ulong offset, Span<byte> data) => inner.ReadRegion(index, offset, data);

    public override int WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        int rc = inner.WriteRegion(index, offset, data);
        if (index == VfioPci.ConfigRegionIndex)
        {
            Unmask();
        }
        return rc;
    }

    public override void Reset()
    {
        inner.Reset();
        Unmask();
    }

    public override void OnAttached(DeviceContext context)
    {
        base.OnAttached(context);
        inner.OnAttached(context);
        Unmask();
    }

    public override void OnDetached()
    {
        inner.OnDetached();
        base.OnDetached();
    }

    private void Unmask()
    {
        var m = inner.Declaration.Msix!;
        Span<byte> zero = stackalloc byte[4];
        zero.Clear();
        for (int v = 0; v < m.VectorCount; v++)
        {
            // Vector Control is dword 3 of each 16-byte entry; writing it through the BAR also delivers pending bits.
            inner.WriteRegion(m.TableBar, m.TableOffset + (ulong)(v * 16) + 12, zero);
        }
    }
}
