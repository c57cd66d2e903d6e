using Vmig.Devices.Accelerator;
using Vmig.Devices.Nvme;
using Vmig.Migration;
using Vmig.VfioUser;
using Vmig.VfioUser.Client;

namespace Vmig.Devices.Tests;

/// <summary>
/// Issue 9 item 3: mutated, truncated, replayed and foreign device states written into every device kind in RESUMING,
/// over real vfio-user sockets. Bit flips, truncations and foreign states are refused cleanly (the streams are
/// CRC-protected and start with a profile record); a replayed stream is refused or loads exactly the original state;
/// the device is usable after a reset, and a valid state still loads afterwards.
/// </summary>
public sealed class HostileMigrationDataTests() : SocketTestScope("vmig-hostile-")
{
    private VfioUserClient NvmeVf(string name)
    {
        string img = Path.Combine(Dir, "ns.img");
        if (!File.Exists(img))
        {
            using var f = File.Create(img);
            f.SetLength(4 << 20);
        }
        var sub = Own(new NvmeSubsystem(new NvmeSubsystemOptions { MaxSecondaryControllers = 1 }));
        uint nsid = sub.AddNamespace(img);
        Assert.True(sub.AttachNamespace(nsid, [1]).IsSuccess);
        sub.ProvisionSecondary(1, 3, 2);
        sub.EnableVfs(1);
        return Serve(sub.GetVfFunction(0)!, name);
    }

    private VfioUserClient AccelVf(string name)
    {
        var pf = Own(new AcceleratorPf(1, AcceleratorProfile.Create(1 << 20, 64)));
        pf.EnableVfs(1);
        new Random(3).NextBytes(pf.GetVf(0).Memory.GetSpan(0, 64 << 10));
        return Serve(pf.GetVf(0), name);
    }

    private static byte[] Save(VfioUserClient c)
    {
        c.SetState(DeviceState.StopCopy);
        var ms = new MemoryStream();
        var buf = new byte[1 << 20];
        int n;
        do
        {
            n = c.ReadMigrationData(buf);
            ms.Write(buf, 0, n);
        }
        while (n == buf.Length);
        c.SetState(DeviceState.Running);
        return ms.ToArray();
    }

    /// <summary>Loads <paramref name="data"/>; true if RESUMING→RUNNING succeeded. On refusal, checks the device is
    /// left in a reported state (never RUNNING with half a state) and recovers with a reset.</summary>
    private static bool TryLoad(VfioUserClient target, byte[] data)
    {
        target.SetState(DeviceState.Resuming);
        try
        {
            target.WriteMigrationData(data);
            target.SetState(DeviceState.Running);
            return true;
        }
        catch (VfioUserException e)
        {
            var st = target.GetState();
            Assert.True(st is DeviceState.Resuming or DeviceState.Stop or DeviceState.Error, $"refused load left the device in {st} ({e.Message})");
            target.Reset();
            Assert.Equal(DeviceState.Running, target.GetState());
            return false;
        }
    }

    public static TheoryData<string> Kinds => new() { "nvme", "accel" };

    [Theory]
    [MemberData(nameof(Kinds))]
    public void Mutated_truncated_replayed_and_foreign_states_are_refused_and_the_device_recovers(string kind)
    {
        var src = kind == "nvme" ? NvmeVf("src") : AccelVf("src");
        var dst = kind == "nvme" ? NvmeVf("dst") : AccelVf("dst");
        var foreignSrc = kind == "nvme" ? AccelVf("foreign") : NvmeVf("foreign");
        byte[] good = Save(src);
        byte[] foreign = Save(foreignSrc);
        Assert.True(good.Length > 64);

        var rng = new Random(20261121);
        for (int i = 0; i < 24; i++)
        {
            var bad = (byte[])good.Clone();
            int at = rng.Next(bad.Length);
            bad[at] ^= (byte)(1 << rng.Next(8));
            Assert.False(TryLoad(dst, bad), $"a bit flip at byte {at} of {good.Length} was accepted");
        }
        foreach (int cut in new[] { 0, 1, 7, good.Length / 3, good.Length / 2, good.Length - 1 })
        {
            Assert.False(TryLoad(dst, good[..cut]), $"a state truncated to {cut} of {good.Length} bytes was accepted");
        }
        // A replay (the same records twice) may be refused or applied idempotently; if it loads, it must be the original.
        if (TryLoad(dst, [.. good, .. good]))
        {
            Assert.Equal(good, Save(dst));
            dst.Reset();
        }
        Assert.False(TryLoad(dst, foreign), "another device kind's state was accepted");

        // Still usable: the real state loads and the device runs.
        Assert.True(TryLoad(dst, good));
        Assert.Equal(DeviceState.Running, dst.GetState());
        Assert.Equal(good, Save(dst));
    }
}
