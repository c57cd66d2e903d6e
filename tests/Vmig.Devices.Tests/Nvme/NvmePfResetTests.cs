using Vmig.Devices.Nvme;
using Vmig.VfioUser;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Tests.Nvme;

/// <summary>The host-only PF socket: a client's DEVICE_RESET must not tear down VFs other VMs use.</summary>
public sealed class NvmePfResetTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-pfreset-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Device_reset_of_a_pf_with_enabled_vfs_is_refused_with_ebusy_and_the_vfs_stay()
    {
        string img = Path.Combine(_dir, "ns.img");
        using (var f = File.Create(img))
        {
            f.SetLength(4 << 20);
        }
        using var sub = new NvmeSubsystem(new NvmeSubsystemOptions { MaxSecondaryControllers = 1 });
        uint nsid = sub.AddNamespace(img);
        Assert.True(sub.AttachNamespace(nsid, [1]).IsSuccess);
        sub.ProvisionSecondary(1, 2, 2);
        sub.EnableVfs(1);
        using var pf = new VfioUserServer(sub.PrimaryFunction, Path.Combine(_dir, "pf.sock"));
        pf.Start();
        using var c = VfioUserClient.Connect(pf.SocketPath);
        Span<byte> id = stackalloc byte[4];
        c.ReadRegion(VfioPci.ConfigRegionIndex, 0, id);
        Assert.Equal(0x5A10, BitConverter.ToUInt16(id[2..]));

        var e = Assert.Throws<VfioUserException>(c.Reset);
        Assert.Equal(Errno.EBUSY, e.Errno);
        Assert.Equal(1, sub.EnabledVfs);
        Assert.NotNull(sub.GetVfFunction(0));
        // The connection survives and the PF still answers.
        Assert.Equal(9, c.GetDeviceInfo().NumRegions);

        // With SR-IOV disabled the reset goes through.
        sub.PrimaryFunction.WriteConfig(Vmig.Devices.Pci.PciFunction.SriovCapabilityOffset + Vmig.Spec.Pci.PciSriov.Control, [0, 0]);
        c.Reset();
    }
}
