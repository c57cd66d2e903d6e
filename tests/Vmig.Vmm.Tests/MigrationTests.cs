using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Vmig.Guest.Workloads;
using Vmig.Migration;
using Vmig.Vmm;
using Vmig.Vmm.Migration;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Tests;

public sealed class MigrationTests : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-vmm-test").FullName;

    public MigrationTests() => _listener.Start();

    public void Dispose()
    {
        _listener.Stop();
        _listener.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    private static IVmDevice NoDevices(DeviceDescription d) => throw new InvalidOperationException($"no device {d.Name} here");

    private static VmConfig TargetGuest() => new() { Programs = TestVms.Registry() };

    [Fact]
    public async Task RamOnlyVm_MigratesOverLoopbackTcp_ByteIdenticalAndTheWorkloadContinues()
    {
        using var src = TestVms.Dirtier(16, "gpa=1M,size=8M,rate=40");
        src.Start();
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > 20);
        var events = new List<MigrationProgress>();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), NoDevices, new MigrationTargetOptions { StartVcpus = false });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { DowntimeLimit = TimeSpan.FromMilliseconds(50), MaxRounds = 8 },
            new SyncProgress(events));
        using var dst = await target;

        Assert.Equal("completed", report.Outcome);
        Assert.Equal(VmRunState.MigratedAway, src.State);
        Assert.Throws<InvalidOperationException>(src.Start);
        Assert.True(src.Memory.GetHostSpan(0, (int)(16 * TestVms.MiB)).SequenceEqual(dst.Memory.GetHostSpan(0, (int)(16 * TestVms.MiB))), "RAM differs");
        Assert.Equal(src.Vcpus[0].Registers, dst.Vcpus[0].Registers);
        ulong atSwitchover = TestVms.PauseAndVerify(dst);
        Assert.True(atSwitchover > 0);

        dst.Start();
        TestVms.WaitUntil(() => dst.Vcpus[0].Slices > 20);
        Assert.True(TestVms.PauseAndVerify(dst) > atSwitchover, "the workload did not continue on the target");

        Assert.Contains(events, e => e.Phase == MigrationPhase.PreCopy && e.Round == 1);
        Assert.Contains(events, e => e.Phase == MigrationPhase.Completed);
        Assert.True(report.Rounds.Count >= 2);
        // Round 1 covers all of RAM: never-touched pages are memfd holes, skipped unread; the rest is read.
        Assert.Equal(4096, report.Rounds[0].Pages + report.Rounds[0].HolePages);
        Assert.InRange(report.Rounds[0].HolePages, 1, 4095);
        Assert.True(report.StepMilliseconds.ContainsKey("downtime.device-stop-copy") && report.StepMilliseconds.ContainsKey("handshake.target-setup"), report.ToJson());
        Assert.True(report.TargetStepMilliseconds.ContainsKey("device-run") && report.TargetStepMilliseconds.ContainsKey("commit-wait"), report.ToJson());
        Assert.True(report.BytesBySection["RamPages"] > 0);
        Assert.InRange(report.DowntimeMilliseconds, 0.001, 5000);
        Assert.Contains("\"Outcome\": \"completed\"", report.ToJson(), StringComparison.Ordinal);
    }

    [Fact]
    public async Task Migration_OverTlsWithThreeRamConnectionsAndADeviceConnection_ByteIdentical()
    {
        string cert = Path.Combine(_dir, "cert.pem"), key = Path.Combine(_dir, "key.pem");
        using (var ec = ECDsa.Create(ECCurve.NamedCurves.nistP256))
        {
            var req = new CertificateRequest("CN=localhost", ec, HashAlgorithmName.SHA256);
            var san = new SubjectAlternativeNameBuilder();
            san.AddDnsName("localhost");
            req.CertificateExtensions.Add(san.Build());
            using var c = req.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(1));
            File.WriteAllText(cert, c.ExportCertificatePem());
            File.WriteAllText(key, ec.ExportPkcs8PrivateKeyPem());
        }
        // A pre-copy device DMAing at 20 MiB (outside the dirtier's range); the target's runs once loaded and DMAs at 30 MiB.
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, [], dmaGpa: 20 * TestVms.MiB);
        Random.Shared.NextBytes(dev.Bar0);
        using var src = TestVms.Dirtier(32, "gpa=0,size=16M,rate=60", [dev]);
        src.Start();
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > 20);
        FakeDevice? t = null;
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => t = new FakeDevice(d.Name, d.MigrationFlags, [], dmaGpa: 30 * TestVms.MiB),
            new MigrationTargetOptions { StartVcpus = false, Tls = new MigrationTlsOptions { CertificatePath = cert, KeyPath = key } });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions
        {
            ParallelConnections = 3,
            MaxRounds = 6,
            Tls = new MigrationTlsOptions { TrustedCertificatePath = cert },
        });
        using var dst = await target;
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Tls);
        Assert.Equal(3, report.Connections);
        Assert.True(report.DeviceDataConnection);
        int below = (int)(30 * TestVms.MiB), above = (int)(2 * TestVms.MiB) - 4096;
        Assert.True(src.Memory.GetHostSpan(0, below).SequenceEqual(dst.Memory.GetHostSpan(0, below)), "RAM differs below 30 MiB");
        Assert.True(src.Memory.GetHostSpan(30 * TestVms.MiB + 4096, above).SequenceEqual(dst.Memory.GetHostSpan(30 * TestVms.MiB + 4096, above)), "RAM differs above 30 MiB");
        Assert.Equal(dev.Bar0, t!.Bar0);
        TestVms.PauseAndVerify(dst);
    }

    [Fact]
    public async Task Tls_SourceRejectsATargetCertificateItDoesNotTrust_AndKeepsRunning()
    {
        string cert = Path.Combine(_dir, "a.pem"), key = Path.Combine(_dir, "a.key"), other = Path.Combine(_dir, "b.pem");
        foreach (var (cp, kp) in new[] { (cert, key), (other, (string?)null) })
        {
            using var ec = ECDsa.Create(ECCurve.NamedCurves.nistP256);
            var req = new CertificateRequest("CN=localhost", ec, HashAlgorithmName.SHA256);
            using var c = req.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(1));
            File.WriteAllText(cp, c.ExportCertificatePem());
            if (kp is not null)
            {
                File.WriteAllText(kp, ec.ExportPkcs8PrivateKeyPem());
            }
        }
        using var src = TestVms.Dirtier(4, "gpa=0,size=1M,rate=10");
        src.Start();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), NoDevices,
            new MigrationTargetOptions { Tls = new MigrationTlsOptions { CertificatePath = cert, KeyPath = key } });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint,
            new MigrationOptions { Tls = new MigrationTlsOptions { TrustedCertificatePath = other } }));
        Assert.Equal("not-started", e.Report.Outcome);
        Assert.Equal(VmRunState.Running, src.State);
        await Assert.ThrowsAnyAsync<Exception>(() => target);
    }

    [Fact]
    public async Task PreallocatedTargetRam_BecomesTheIncomingVmsRam_ByteIdenticalAndTheWorkloadVerifies()
    {
        using var src = TestVms.Dirtier(16, "gpa=1M,size=8M,rate=40");
        src.Start();
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > 20);
        var ram = GuestRam.Create(16 * TestVms.MiB, "prealloc-test", prefault: true);
        Assert.True(ram.Prefaulted);
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), NoDevices,
            new MigrationTargetOptions { StartVcpus = false, PreallocatedMemory = ram });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { DowntimeLimit = TimeSpan.FromMilliseconds(50), MaxRounds = 8 });
        using var dst = await target;
        Assert.Equal("completed", report.Outcome);
        Assert.Same(ram, dst.Memory);
        Assert.True(src.Memory.GetHostSpan(0, (int)(16 * TestVms.MiB)).SequenceEqual(dst.Memory.GetHostSpan(0, (int)(16 * TestVms.MiB))), "RAM differs");
        TestVms.PauseAndVerify(dst);
    }

    [Fact]
    public async Task PreallocatedTargetRam_OfAnotherSize_RefusesAtHandshake_AndIsReleased()
    {
        using var src = TestVms.Dirtier(8, "gpa=0,size=2M,rate=20");
        src.Start();
        var ram = GuestRam.Create(4 * TestVms.MiB, "prealloc-test", prefault: true);
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), NoDevices, new MigrationTargetOptions { PreallocatedMemory = ram });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint));
        Assert.Equal("refused", e.Report.Outcome);
        Assert.Contains("preallocated", e.Report.Error, StringComparison.Ordinal);
        await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.True(ram.Fd.IsClosed, "the refused migration did not release the preallocated RAM");
        Assert.Equal(VmRunState.Running, src.State);
    }

    [Fact]
    public async Task TargetRefusesAtHandshake_SourceUntouchedAndRunning()
    {
        using var src = TestVms.Dirtier(8, "gpa=0,size=2M,rate=20");
        src.Start();
        var target = MigrationTarget.AcceptAsync(_listener, new VmConfig(), NoDevices); // knows no program kinds
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint));
        Assert.Equal("refused", e.Report.Outcome);
        Assert.Contains("memory-dirtier", e.Report.Error, StringComparison.Ordinal);
        var te = await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.Equal("refused", te.Report.Outcome);
        Assert.Equal(VmRunState.Running, src.State);
        long s = src.Vcpus[0].Slices;
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > s + 5);
        TestVms.PauseAndVerify(src);
    }

    [Fact]
    public async Task TargetRefusesAnIncompatibleDevice_BeforeAnyStateMoves()
    {
        var log = new List<string>();
        using var src = TestVms.Dirtier(8, "gpa=0,size=2M,rate=20", [new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P, log)]);
        src.Start();
        var tlog = new List<string>();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => new FakeDevice(d.Name, MigrationFlags.StopCopy, tlog));
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint));
        Assert.Equal("refused", e.Report.Outcome);
        Assert.Contains("migration flags", e.Report.Error, StringComparison.Ordinal);
        await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.Empty(log); // the source device never left RUNNING
        Assert.Equal(DeviceState.Running, src.Devices[0].GetState());
    }

    [Fact]
    public async Task ConnectionCutMidRam_SourceRollsBackDevicesAndKeepsRunning()
    {
        var log = new List<string>();
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, log, dmaGpa: 0x3000);
        using var src = TestVms.Dirtier(64, "gpa=1M,size=4M,rate=20", [dev]);
        // Non-zero data everywhere so the first round is ~64 MiB, far more than socket buffers hold.
        var fill = Enumerable.Repeat((byte)0x5A, (int)TestVms.MiB).ToArray();
        for (ulong m = 8; m < 64; m++)
        {
            src.Memory.Write(m * TestVms.MiB, fill);
        }
        src.Start();
        var fake = Task.Run(() =>
        {
            using var s = _listener.AcceptSocket();
            using var ns = new NetworkStream(s);
            var (r, w) = AcceptHandshake(ns);
            for (int n = 0; n < 5 && r.ReadNext();)
            {
                n += r.Type == SectionType.RamPages ? 1 : 0;
            }
            s.LingerState = new LingerOption(true, 0); // RST: a cut, not a clean close
        });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint));
        await fake;
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.Equal(VmRunState.Running, src.State);
        Assert.Equal(DeviceState.Running, dev.GetState());
        Assert.Contains("d0:Running->PreCopy", log);
        long s0 = src.Vcpus[0].Slices;
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > s0 + 5);
        TestVms.PauseAndVerify(src);
    }

    [Fact]
    public async Task Devices_SwitchoverInP2PSafeOrder_StateAndDmaDirtyPagesArrive()
    {
        var slog = new List<string>();
        var tlog = new List<string>();
        var a = new FakeDevice("a", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, slog, dmaGpa: 0x2000);
        var b = new FakeDevice("b", MigrationFlags.StopCopy, slog, dmaGpa: 0x5000) { SupportsDirtyLogging = true };
        var c = new FakeDevice("c", MigrationFlags.StopCopy | MigrationFlags.P2P, slog, dmaGpa: 0x6000);
        Random.Shared.NextBytes(a.Bar0);
        Random.Shared.NextBytes(b.Bar0);
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20", [a, b, c]);
        src.Start();
        TestVms.WaitUntil(() => a.Counter > 20 && b.Counter > 20);
        var targets = new Dictionary<string, FakeDevice>();
        // Target devices DMA to a page of their own, so what the source devices wrote last stays visible.
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => targets[d.Name] = new FakeDevice(d.Name, d.MigrationFlags, tlog, dmaGpa: 0x7000),
            new MigrationTargetOptions { StartVcpus = false });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 4 });
        using var dst = await target;
        Assert.Equal("completed", report.Outcome);
        Assert.Equal(1, report.PrecopyDevices);

        // Source: every P2P device quiesced before any device stops.
        int lastP2P = Math.Max(slog.IndexOf("a:PreCopy->PreCopyP2P"), slog.IndexOf("c:Running->RunningP2P"));
        int firstStop = new[] { slog.IndexOf("a:PreCopyP2P->StopCopy"), slog.IndexOf("b:Running->Stop"), slog.IndexOf("c:RunningP2P->Stop") }.Min();
        Assert.True(lastP2P >= 0 && firstStop > lastP2P, string.Join(", ", slog));
        Assert.DoesNotContain("b:Running->PreCopy", slog); // no PRE_COPY, no pre-copy

        // Target: RESUMING→STOP for all, then →RUNNING_P2P for all, then →RUNNING.
        int lastCommit = new[] { "a", "b", "c" }.Max(n => tlog.IndexOf($"{n}:Resuming->Stop"));
        int firstP2P = new[] { "a", "c" }.Min(n => tlog.IndexOf($"{n}:Stop->RunningP2P"));
        int lastP2PT = new[] { "a", "c" }.Max(n => tlog.IndexOf($"{n}:Stop->RunningP2P"));
        int firstRun = new[] { tlog.IndexOf("a:RunningP2P->Running"), tlog.IndexOf("b:Stop->Running"), tlog.IndexOf("c:RunningP2P->Running") }.Min();
        Assert.True(lastCommit < firstP2P && lastP2PT < firstRun, string.Join(", ", tlog));

        Assert.Equal(a.Bar0, targets["a"].Bar0);
        Assert.Equal(b.Bar0, targets["b"].Bar0);
        Assert.True(targets["a"].Counter >= a.Counter);
        // The last value each source device DMA'd reached the target only through its dirty report.
        Assert.Equal(a.Counter, dst.Memory.ReadUInt64(0x2000));
        Assert.Equal(b.Counter, dst.Memory.ReadUInt64(0x5000));
        Assert.Equal(c.Counter, dst.Memory.ReadUInt64(0x6000));
        Assert.All(targets.Values, d => Assert.Equal(DeviceState.Running, d.GetState()));
        TestVms.PauseAndVerify(dst);
    }

    [Fact]
    public async Task DeviceWithoutDirtyLogging_EveryRoundResendsRam_ButNoSourceHoleIsAllocatedByTheReads()
    {
        var slog = new List<string>();
        var d = new FakeDevice("d", MigrationFlags.StopCopy, slog, dmaGpa: 0x3000) { SupportsDirtyLogging = false };
        using var src = TestVms.Dirtier(8, "gpa=1M,size=1M,rate=20", [d]);
        src.Start();
        TestVms.WaitUntil(() => d.Counter > 5 && src.Vcpus[0].Slices > 5);
        // The dirtier stays inside its 1 MiB and the device on its page: every other page is a hole for good.
        long Allocated()
        {
            var all = new PageBitmap(src.Memory.PageCount);
            all.SetAll();
            return src.Memory.KeepAllocatedPages(all);
        }
        long before = Allocated();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), x => new FakeDevice(x.Name, x.MigrationFlags, [], dmaGpa: 0x7000),
            new MigrationTargetOptions { StartVcpus = false });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3 });
        using var dst = await target;
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Rounds.Count >= 2, "expected a round after the first (all of RAM dirty again)");
        // Pages are read through the mapping: a read of a hole would have allocated it (all 2048 pages).
        Assert.InRange(Allocated(), before, 257 + 1);
        Assert.Equal(d.Counter, dst.Memory.ReadUInt64(0x3000));
        // Everything but page 7, where the target's own device DMAs once it runs.
        Assert.True(src.Memory.GetHostSpan(0, 0x7000).SequenceEqual(dst.Memory.GetHostSpan(0, 0x7000)), "RAM differs");
        Assert.True(src.Memory.GetHostSpan(0x8000, (int)(8 * TestVms.MiB) - 0x8000).SequenceEqual(dst.Memory.GetHostSpan(0x8000, (int)(8 * TestVms.MiB) - 0x8000)), "RAM differs");
        TestVms.PauseAndVerify(dst);
    }

    [Fact]
    public async Task TargetDeviceFailsResumingToStop_SourceResumesAndTargetReleasesDevices()
    {
        var slog = new List<string>();
        var a = new FakeDevice("a", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, slog, dmaGpa: 0x2000);
        using var src = TestVms.Dirtier(8, "gpa=1M,size=2M,rate=20", [a]);
        src.Start();
        FakeDevice? t = null;
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => t = new FakeDevice(d.Name, d.MigrationFlags, [], dmaGpa: 0x7000) { FailCommit = true });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3 }));
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.Contains("injected commit failure", e.Report.Error, StringComparison.Ordinal);
        var te = await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.Equal("failed", te.Report.Outcome);
        Assert.True(t!.Disposed && t.ResetCount > 0);
        Assert.Equal(VmRunState.Running, src.State);
        Assert.Equal(DeviceState.Running, a.GetState());
        ulong c0 = a.Counter;
        TestVms.WaitUntil(() => a.Counter > c0 + 3); // the source device DMAs again
        TestVms.PauseAndVerify(src);
    }

    [Fact]
    public void Snapshot_RestoreRoundTrip_AndACorruptSnapshotIsRejected()
    {
        var a = new FakeDevice("a", MigrationFlags.StopCopy | MigrationFlags.P2P, [], dmaGpa: 0x2000);
        Random.Shared.NextBytes(a.Bar0);
        using var src = TestVms.Dirtier(8, "gpa=1M,size=4M,rate=40", [a]);
        src.Start();
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > 20);
        src.Pause();
        string file = Path.Combine(_dir, "vm.snap");
        MigrationReport report;
        using (var fs = File.Create(file))
        {
            report = VmSnapshot.Save(src, fs);
        }
        Assert.Equal("completed", report.Outcome);
        Assert.Equal(VmRunState.Paused, src.State);
        Assert.Equal(DeviceState.Running, a.GetState());
        // The source device DMAs again after the save; everything else in RAM is frozen with the paused vCPUs.
        byte[] ram = src.Memory.GetHostSpan(0, 8 << 20).ToArray();

        FakeDevice? restored = null;
        using (var fs = File.OpenRead(file))
        using (var vm = VmSnapshot.Restore(fs, TargetGuest(), d => restored = new FakeDevice(d.Name, d.MigrationFlags, [], dmaGpa: 0x7000), start: false))
        {
            // Pages 0x2000 (source device DMA) and 0x7000 (restored device DMA) are live; compare the rest.
            foreach (var (from, to) in new[] { (0, 0x2000), (0x3000, 0x7000), (0x8000, 8 << 20) })
            {
                Assert.True(ram.AsSpan(from, to - from).SequenceEqual(vm.Memory.GetHostSpan((ulong)from, to - from)), $"RAM differs in [{from:x}, {to:x})");
            }
            Assert.Equal(restored!.CounterAtCommit, vm.Memory.ReadUInt64(0x2000));
            Assert.Equal(a.Bar0, restored!.Bar0);
            ulong w = TestVms.PauseAndVerify(vm);
            vm.Start();
            TestVms.WaitUntil(() => vm.Vcpus[0].Slices > 20);
            Assert.True(TestVms.PauseAndVerify(vm) > w);
        }

        byte[] bytes = File.ReadAllBytes(file);
        bytes[bytes.Length / 2] ^= 0x10;
        FakeDevice? discarded = null;
        Assert.Throws<StreamFormatException>(() => VmSnapshot.Restore(new MemoryStream(bytes), TargetGuest(), d => discarded = new FakeDevice(d.Name, d.MigrationFlags, [])));
        Assert.True(discarded!.Disposed);
    }

    [Fact]
    public async Task MaxBandwidth_CapsTheSendRate()
    {
        using var src = TestVms.Dirtier(16, "gpa=0,size=1M,rate=1");
        var fill = Enumerable.Repeat((byte)0x77, (int)TestVms.MiB).ToArray();
        for (ulong m = 2; m < 16; m++)
        {
            src.Memory.Write(m * TestVms.MiB, fill);
        }
        src.Start();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), NoDevices);
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxBandwidth = 40L << 20 });
        using var dst = await target;
        // ≥ 14 MiB of page data at 40 MiB/s takes ≥ 350 ms; unthrottled loopback does it in a few tens of ms.
        Assert.True(report.TotalBytes > 14 * (long)TestVms.MiB);
        Assert.True(report.TotalMilliseconds >= 330, $"{report.TotalMilliseconds} ms");
        Assert.All(report.Rounds.Where(r => r.Bytes > (4 << 20)), r => Assert.True(r.BandwidthBytesPerSecond < 48 << 20, r.ToString()));
    }

    [Fact]
    public async Task NonConvergingVm_StopsAtMaxRoundsAndStillMigratesConsistently()
    {
        // Unthrottled dirtying of 8 MiB with a 0 ms downtime limit never converges: switchover is forced by MaxRounds.
        // The 32 MiB/s cap makes every round last long enough for the dirtier to dirty pages on any machine (an
        // idle fast machine otherwise finished a round before the dirtier's vCPU was scheduled, and converged).
        using var src = TestVms.Dirtier(16, "gpa=0,size=8M,rate=0");
        src.Start();
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > 20);
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), NoDevices, new MigrationTargetOptions { StartVcpus = false });
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3, DowntimeLimit = TimeSpan.Zero, MaxBandwidth = 32L << 20 });
        using var dst = await target;
        Assert.Equal(4, report.Rounds.Count); // 3 pre-copy rounds + the final one
        Assert.True(report.Rounds[^1].Pages > 0);
        Assert.True(src.Memory.GetHostSpan(0, 16 << 20).SequenceEqual(dst.Memory.GetHostSpan(0, 16 << 20)));
        TestVms.PauseAndVerify(dst);
    }

    [Fact]
    public async Task IdleVm_ConvergesAfterTheFirstRound()
    {
        using var src = TestVms.Dirtier(16, "gpa=0,size=1M,rate=1");
        src.Start();
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), NoDevices);
        var report = await MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 30, DowntimeLimit = TimeSpan.FromMilliseconds(300) });
        using var dst = await target;
        Assert.InRange(report.Rounds.Count, 2, 3);
        Assert.True(report.Rounds[^1].Pages < 64, report.ToJson());
    }

    [Theory]
    [InlineData(SectionType.RamPages, "rolled-back")]             // mid pre-copy
    [InlineData(SectionType.DeviceInitialDataSent, "rolled-back")] // while the source waits for the switchover-ack
    [InlineData(SectionType.EndOfState, "rolled-back")]            // whole state sent, no TargetReady: the target cannot run
    [InlineData(SectionType.Commit, "in-doubt")]                   // Commit sent, no result: the source must not resume
    public async Task ConnectionCut_InEachPhase_SourceRollsBackOrStaysPausedInDoubt(SectionType cutAfter, string outcome)
    {
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy, [], dmaGpa: 0x3000);
        using var src = TestVms.Dirtier(16, "gpa=1M,size=4M,rate=20", [dev]);
        src.Start();
        TestVms.WaitUntil(() => src.Vcpus[0].Slices > 10);
        var fake = Task.Run(() =>
        {
            using var s = _listener.AcceptSocket();
            using var ns = new NetworkStream(s);
            var (r, w) = AcceptHandshake(ns);
            while (r.ReadNext() && r.Type != cutAfter)
            {
                if (r.Type == SectionType.DeviceInitialDataSent)
                {
                    w.Write(SectionType.SwitchoverAck, r.Payload);
                    w.Flush();
                }
                if (r.Type == SectionType.EndOfState)
                {
                    w.Write(SectionType.TargetReady, []);
                    w.Flush();
                }
            }
            s.LingerState = new LingerOption(true, 0);
        });
        var e = await Assert.ThrowsAsync<VmMigrationException>(() => MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxRounds = 3 }));
        await fake;
        Assert.Equal(outcome, e.Report.Outcome);
        if (outcome == "rolled-back")
        {
            Assert.Equal(VmRunState.Running, src.State);
            Assert.Equal(DeviceState.Running, dev.GetState());
            long s0 = src.Vcpus[0].Slices;
            TestVms.WaitUntil(() => src.Vcpus[0].Slices > s0 + 5);
        }
        else
        {
            Assert.Equal(VmRunState.Paused, src.State);
            Assert.Equal(DeviceState.StopCopy, dev.GetState());
            long s0 = src.Vcpus[0].Slices;
            Thread.Sleep(50);
            Assert.Equal(s0, src.Vcpus[0].Slices);
            // The operator knows the target is gone: recover explicitly.
            Assert.Null(MigrationRecovery.ResumeInDoubtSource(src));
            Assert.Equal(DeviceState.Running, dev.GetState());
            TestVms.WaitUntil(() => src.Vcpus[0].Slices > s0 + 5);
        }
        TestVms.PauseAndVerify(src);
    }

    [Fact]
    public async Task Cancellation_DuringPreCopy_RollsBackAndTheTargetDiscards()
    {
        var log = new List<string>();
        var dev = new FakeDevice("d0", MigrationFlags.StopCopy | MigrationFlags.PreCopy, log, dmaGpa: 0x3000);
        using var src = TestVms.Dirtier(32, "gpa=1M,size=4M,rate=20", [dev]);
        var fill = Enumerable.Repeat((byte)0x11, (int)TestVms.MiB).ToArray();
        for (ulong m = 8; m < 32; m++)
        {
            src.Memory.Write(m * TestVms.MiB, fill);
        }
        src.Start();
        FakeDevice? t = null;
        var target = MigrationTarget.AcceptAsync(_listener, TargetGuest(), d => t = new FakeDevice(d.Name, d.MigrationFlags, []));
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(150));
        var e = await Assert.ThrowsAsync<VmMigrationException>(() =>
            MigrationSource.RunAsync(src, _listener.LocalEndpoint, new MigrationOptions { MaxBandwidth = 20L << 20 }, null, cts.Token));
        Assert.Equal("rolled-back", e.Report.Outcome);
        Assert.Contains("cancelled", e.Report.Error, StringComparison.Ordinal);
        await Assert.ThrowsAsync<VmMigrationException>(() => target);
        Assert.True(t!.Disposed);
        Assert.Equal(VmRunState.Running, src.State);
        Assert.Equal(DeviceState.Running, dev.GetState());
        TestVms.PauseAndVerify(src);
    }

    /// <summary>A fake target's side of the handshake: reads the description and says yes.</summary>
    internal static (SectionReader Reader, SectionWriter Writer) AcceptHandshake(NetworkStream ns)
    {
        var r = new SectionReader(ns, 4 << 20);
        r.ReadStreamHeader();
        r.Expect(SectionType.VmDescription);
        var w = new SectionWriter(ns);
        // A 1.0 target: it sends no RoundApplied, so the source must not wait for one.
        w.WriteStreamHeader(minor: 0);
        w.Write(SectionType.HandshakeReply, SectionIo.StatusPayload(0, null));
        w.Flush();
        return (r, w);
    }

    private sealed class SyncProgress(List<MigrationProgress> sink) : IProgress<MigrationProgress>
    {
        public void Report(MigrationProgress value)
        {
            lock (sink)
            {
                sink.Add(value);
            }
        }
    }
}
