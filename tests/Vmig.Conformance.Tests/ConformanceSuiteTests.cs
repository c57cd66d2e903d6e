using System.Text.Json;
using System.Xml.Linq;
using Vmig.Migration;
using Vmig.TestPeer;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Server;
using Xunit.Abstractions;

namespace Vmig.Conformance.Tests;

/// <summary>SampleDevice's DMA engine as the dirty-logging stimulus: command 2 copies BAR[0x1000..] to guest memory.</summary>
internal sealed class SampleDeviceDmaWrites : IDmaWriteStimulus
{
    public void MakeDeviceWrite(VfioUserClient client, ulong iova, int length) =>
        SampleDeviceDriver.RunDma(client, SampleDeviceDriver.BarToGuest, iova, 0x1000, (ulong)length);
}

public sealed class ConformanceSuiteTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-conf-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private static readonly ConformanceOptions Options = new() { DmaWriteStimulus = new SampleDeviceDmaWrites(), TimeoutMs = 10_000 };

    private ConformanceReport RunInProcess(VfioUserDevice device, ConformanceOptions? options = null, VfioUserServerOptions? serverOptions = null)
    {
        using var server = new VfioUserServer(device, Path.Combine(_dir, Guid.NewGuid().ToString("N")[..8] + ".sock"), serverOptions);
        server.Start();
        return ConformanceSuite.Run(server.SocketPath, options ?? Options);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(5)]
    [InlineData(7)]
    public void Sample_device_passes_every_check_for_its_flag_set(ulong flagValue)
    {
        var flags = (MigrationFlags)flagValue;
        using var dev = new SampleDevice(flags);
        var report = RunInProcess(dev);
        output.WriteLine(report.Summary());
        Assert.True(report.Success, report.Summary());
        Assert.Equal(flagValue, report.MigrationFlags);
        int states = ExpectedTransitions.States(flags).Count;
        Assert.Equal(states * 9, report.Checks.Count(c => c.Category == "transitions"));
        Assert.All(report.Checks.Where(c => c.Category == "transitions"), c => Assert.Equal(CheckOutcome.Pass, c.Outcome));
        // With the stimulus every dirty-logging check runs; only pre-copy is skipped where the flags lack it.
        var skipped = report.Checks.Where(c => c.Outcome == CheckOutcome.Skip).Select(c => c.Id).ToList();
        Assert.Equal((flags & MigrationFlags.PreCopy) == 0 ? ["data.pre-copy-stream"] : [], skipped);
        foreach (var id in new[] { "negotiation.version", "features.migration-flags", "data.any-read-size-same-bytes", "data.truncated-load-refused",
            "reset.from-STOP_COPY", "gating.dma-map.STOP", "dirty-logging.bit-order", "dirty-logging.page-size-folding", "validation.get-and-set",
            "resilience.msg-size-over-bound", "resilience.msg-size-below-header" })
        {
            Assert.Equal(CheckOutcome.Pass, report.Checks.Single(c => c.Id == id).Outcome);
        }
        Assert.All(report.Checks, c => Assert.False(string.IsNullOrEmpty(c.SpecClause)));
    }

    [Fact]
    public void Without_extensions_p2p_is_invisible_and_the_base_protocol_passes()
    {
        using var dev = new SampleDevice();
        var report = RunInProcess(dev, Options with { RequestExtensions = false });
        Assert.True(report.Success, report.Summary());
        Assert.Equal(5UL, report.MigrationFlags);
        Assert.Equal(CheckOutcome.Skip, report.Checks.Single(c => c.Id == "data.mig-data-size").Outcome);
    }

    [Fact]
    public void A_server_that_offers_no_extensions_passes_on_the_base_protocol()
    {
        using var dev = new SampleDevice();
        var report = RunInProcess(dev, null, new VfioUserServerOptions { OfferExtensions = false, OfferTwinSocket = false, MaxDataXferSize = 64 * 1024 });
        Assert.True(report.Success, report.Summary());
        Assert.Equal(5UL, report.MigrationFlags);
        Assert.Contains("max_data_xfer_size 65536", report.Checks.Single(c => c.Id == "negotiation.version").Reason, StringComparison.Ordinal);
    }

    [Fact]
    public void A_device_whose_stop_copy_stream_never_ends_fails_the_stream_checks()
    {
        using var dev = new BrokenDevice(BrokenMode.EndlessStopCopy, MigrationFlags.StopCopy);
        var report = RunInProcess(dev, Options with { MaxStreamBytes = 1 << 20 });
        Assert.False(report.Success);
        var failed = report.Failures.Select(c => c.Id).ToHashSet();
        Assert.Contains("data.stop-copy-stream-ends", failed);
        Assert.Contains("did not end", report.Checks.Single(c => c.Id == "data.stop-copy-stream-ends").Reason, StringComparison.Ordinal);
        Assert.DoesNotContain(failed, id => id.StartsWith("transition.", StringComparison.Ordinal) || id.StartsWith("validation.", StringComparison.Ordinal));
    }

    [Fact]
    public void A_device_that_reports_the_wrong_state_fails_exactly_the_transitions_into_resuming()
    {
        using var dev = new BrokenDevice(BrokenMode.WrongStateAfterResuming, MigrationFlags.StopCopy | MigrationFlags.P2P);
        var report = RunInProcess(dev);
        Assert.False(report.Success);
        var failedTransitions = report.Failures.Where(c => c.Category == "transitions").Select(c => c.Id).ToList();
        Assert.NotEmpty(failedTransitions);
        // Into RESUMING the state is wrong; out of RESUMING the suite cannot even get there.
        Assert.All(failedTransitions, id => Assert.Contains("RESUMING", id, StringComparison.Ordinal));
        Assert.Contains("transition.SC|P2P.RUNNING->RESUMING", failedTransitions);
    }

    [Fact]
    public void A_device_that_accepts_a_truncated_stream_fails_the_load_validation_check()
    {
        using var dev = new BrokenDevice(BrokenMode.AcceptsCorruptLoad, MigrationFlags.StopCopy | MigrationFlags.PreCopy);
        var report = RunInProcess(dev);
        Assert.Equal(["data.truncated-load-refused"], report.Failures.Select(c => c.Id));
    }

    [Fact]
    public void Suite_checks_a_server_in_another_process_and_catches_a_broken_one()
    {
        string good = Path.Combine(_dir, "good.sock"), bad = Path.Combine(_dir, "bad.sock");
        using (var peer = PeerProcess.Start(["serve", good, "7"]))
        {
            var report = ConformanceSuite.Run(good, Options);
            Assert.True(report.Success, report.Summary());
            Assert.False(peer.HasExited);
        }
        using (var peer = PeerProcess.Start(["serve-broken", bad, "EndlessStopCopy", "3"]))
        {
            var report = ConformanceSuite.Run(bad, Options with { MaxStreamBytes = 1 << 20 });
            Assert.False(report.Success);
            Assert.Contains(report.Failures, c => c.Id == "data.stop-copy-stream-ends");
        }
    }

    [Fact]
    public void Nothing_listening_is_a_failed_report_not_an_exception()
    {
        var report = ConformanceSuite.Run(Path.Combine(_dir, "nobody.sock"), Options with { TimeoutMs = 300 });
        Assert.False(report.Success);
        Assert.Null(report.MigrationFlags);
    }

    [Fact]
    public void Report_writes_json_and_junit_that_parse_back_with_the_same_counts()
    {
        var checks = new List<CheckResult>
        {
            new("a.pass", "alpha", CheckOutcome.Pass, "fine", "spec §1", 1.5),
            new("a.fail", "alpha", CheckOutcome.Fail, "expected <EINVAL> & got \"0\"", "spec §2", 2),
            new("b.skip", "beta", CheckOutcome.Skip, "not offered", "spec §3", 0),
        };
        var r = new ConformanceReport("/tmp/x.sock", DateTimeOffset.UnixEpoch, TimeSpan.FromSeconds(2), 7, checks);
        Assert.Equal((1, 1, 1, false), (r.Passed, r.Failed, r.Skipped, r.Success));

        using var json = JsonDocument.Parse(r.ToJson());
        var root = json.RootElement;
        Assert.Equal("/tmp/x.sock", root.GetProperty("target").GetString());
        Assert.Equal(1, root.GetProperty("failed").GetInt32());
        Assert.Equal(7UL, root.GetProperty("migrationFlags").GetUInt64());
        var arr = root.GetProperty("checks");
        Assert.Equal(3, arr.GetArrayLength());
        Assert.Equal("Fail", arr[1].GetProperty("outcome").GetString());
        Assert.Equal("spec §2", arr[1].GetProperty("specClause").GetString());

        var x = XDocument.Parse(r.ToJUnitXml());
        Assert.Equal("3", x.Root!.Attribute("tests")!.Value);
        Assert.Equal(2, x.Root.Elements("testsuite").Count());
        var cases = x.Descendants("testcase").ToList();
        Assert.Equal(3, cases.Count);
        var failure = Assert.Single(x.Descendants("failure"));
        Assert.Equal("expected <EINVAL> & got \"0\"", failure.Attribute("message")!.Value);
        Assert.Single(x.Descendants("skipped"));
        Assert.Equal("0.002", cases[1].Attribute("time")!.Value);

        string jf = Path.Combine(_dir, "r.json"), xf = Path.Combine(_dir, "r.xml");
        r.WriteJson(jf);
        r.WriteJUnit(xf);
        Assert.Equal(r.ToJson(), File.ReadAllText(jf));
        Assert.Contains("a.fail", r.Summary(), StringComparison.Ordinal);
    }

    [Fact]
    public void Expected_tables_match_reference_examples_and_refuse_what_the_uapi_refuses()
    {
        const MigrationFlags all = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;
        static string P(MigrationFlags f, DeviceState a, DeviceState b) =>
            ExpectedTransitions.Path(f, (uint)a, (uint)b) is { } p ? string.Join(",", p.Select(x => x.To)) : "EINVAL";
        Assert.Equal("RunningP2P,Stop,StopCopy", P(all, DeviceState.Running, DeviceState.StopCopy));
        Assert.Equal("PreCopyP2P,StopCopy", P(all, DeviceState.PreCopy, DeviceState.StopCopy));
        Assert.Equal("Stop,RunningP2P,Running,PreCopy", P(all, DeviceState.Resuming, DeviceState.PreCopy));
        Assert.Equal("EINVAL", P(all, DeviceState.StopCopy, DeviceState.PreCopy));
        Assert.Equal("EINVAL", P(all, DeviceState.Running, DeviceState.Error));
        Assert.Equal("Stop,StopCopy", P(MigrationFlags.StopCopy, DeviceState.Running, DeviceState.StopCopy));
        Assert.Equal("StopCopy", P(MigrationFlags.StopCopy | MigrationFlags.PreCopy, DeviceState.PreCopy, DeviceState.StopCopy));
        Assert.Equal("EINVAL", P(MigrationFlags.StopCopy | MigrationFlags.PreCopy, DeviceState.Running, DeviceState.RunningP2P));
        Assert.Equal("", P(MigrationFlags.StopCopy, DeviceState.Stop, DeviceState.Stop));
        Assert.Null(ExpectedTransitions.Path(MigrationFlags.StopCopy, 2, 8));
        Assert.True(ExpectedTransitions.OpensStream(DeviceState.RunningP2P, DeviceState.PreCopyP2P));
        Assert.False(ExpectedTransitions.OpensStream(DeviceState.PreCopy, DeviceState.PreCopyP2P));
        Assert.True(ExpectedTransitions.ClosesStream(DeviceState.PreCopy, DeviceState.Running));
        Assert.False(ExpectedTransitions.ClosesStream(DeviceState.PreCopyP2P, DeviceState.StopCopy));
    }
}
