using System.Globalization;
using System.Text;
using Vmig.Guest.Os;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;

namespace Vmig.Cli.Vm;

/// <summary>
/// What a VMM can see of a function before it runs it, as the compatibility key of the migration handshake:
/// PCI ids and class, region sizes and flags, IRQ counts, migration flags. A target VF with any difference is
/// refused before state moves; finer device checks (NVMe namespaces, accelerator memory) happen in the device when
/// its state is loaded.
/// </summary>
internal static class DeviceProfile
{
    public static (GuestDriverKind Kind, string Profile) Read(VfioUserClient c)
    {
        Span<byte> cfg = stackalloc byte[12];
        c.ReadRegion(VfioPci.ConfigRegionIndex, 0, cfg);
        uint classCode = (uint)(cfg[9] | (cfg[10] << 8) | (cfg[11] << 16));
        var kind = classCode switch
        {
            0x010802 => GuestDriverKind.Nvme,
            0x120000 => GuestDriverKind.Accelerator,
            _ => GuestDriverKind.None,
        };
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"{BitConverter.ToUInt16(cfg):x4}:{BitConverter.ToUInt16(cfg[2..]):x4} class {classCode:x6}");
        var info = c.GetDeviceInfo();
        for (int i = 0; i < Math.Min(info.NumRegions, VfioPci.NumRegions); i++)
        {
            var r = c.GetRegionInfo(i);
            r.MmapFd?.Dispose();
            if (r.Size != 0)
            {
                sb.Append(CultureInfo.InvariantCulture, $" r{i}=0x{r.Size:x}");
            }
        }
        for (int i = 0; i < Math.Min(info.NumIrqs, VfioPci.NumIrqs); i++)
        {
            uint n = c.GetIrqInfo(i).Count;
            if (n != 0)
            {
                sb.Append(CultureInfo.InvariantCulture, $" irq{i}={n}");
            }
        }
        return (kind, sb.ToString());
    }

    public static string KindName(GuestDriverKind k) => k switch
    {
        GuestDriverKind.Nvme => "nvme",
        GuestDriverKind.Accelerator => "accel",
        _ => "other",
    };
}
