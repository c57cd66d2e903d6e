using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using Vmig.Vmm.Stream;

namespace Vmig.Cli.Tests;

/// <summary>
/// `vmig resolve` (issue 9, in-doubt resolution) against a real `vmig vm` process. A scripted target takes the whole
/// state, answers TargetReady, receives Commit and then resets the connection without a result: the source is in doubt
/// (the only window the two-phase end leaves). `vmig status` shows it, migrate/snapshot are refused, and the operator's
/// `vmig resolve --resume` or `--discard` ends it.
/// </summary>
public sealed class InDoubtResolveTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-indoubt-").FullName;
    private readonly VmigProcesses _procs = new();
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);

    public InDoubtResolveTests() => _listener.Start();

    public void Dispose()
    {
        _listener.Stop();
        _listener.Dispose();
        _procs.Dispose();
        Directory.Delete(_dir, true);
    }

    private string StartVm(string name)
    {
        string cfg = Path.Combine(_dir, name + ".json");
        File.WriteAllText(cfg, JsonSerializer.Serialize(new
        {
            name,
            memory = "16M",
            runtimeDir = _dir,
            workloads = new object[] { new { kind = "memory-dirtier", size = "4M", rate = "4M" } },
        }));
        _procs.Start("vm", "--config", cfg);
        string ctl = Path.Combine(_dir, name + ".ctl");
        VmigProcesses.WaitFor(() => File.Exists(ctl), name + " control socket");
        return ctl;
    }

    /// <summary>A target that runs the protocol up to Commit and then vanishes (RST) without a TargetResult.</summary>
    private Task ScriptedTargetLosingTheResult() => Task.Run(() =>
    {
        using var s = _listener.AcceptSocket();
        using var ns = new NetworkStream(s);
        var r = new SectionReader(ns, 4 << 20);
        r.ReadStreamHeader();
        r.Expect(SectionType.VmDescription);
        var w = new SectionWriter(ns);
        // A 2.0 target: it sends no RoundApplied (2.1), so the source must not wait for one.
        w.WriteStreamHeader(minor: 0);
        w.Write(SectionType.HandshakeReply, SectionIo.StatusPayload(0, null));
        w.Flush();
        while (r.ReadNext() && r.Type != SectionType.EndOfState)
        {
        }
        w.Write(SectionType.TargetReady, []);
        w.Flush();
        r.Expect(SectionType.Commit);
        s.LingerState = new LingerOption(true, 0);
    });

    private JsonElement Status(string ctl) => VmigProcesses.Control(ctl, "{\"op\":\"status\"}").GetProperty("result");

    private void MigrateIntoDoubt(string ctl)
    {
        var target = ScriptedTargetLosingTheResult();
        var (code, output) = VmigProcess.Run(TimeSpan.FromSeconds(60), "migrate", ctl, "--to", $"tcp:127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}");
        Assert.True(target.Wait(TimeSpan.FromSeconds(30)));
        Assert.Equal(1, code);
        Assert.Contains("in doubt", output, StringComparison.Ordinal);
        Assert.Contains("vmig resolve", output, StringComparison.Ordinal); // the operator is told what to do
        var st = Status(ctl);
        Assert.Equal("Paused", st.GetProperty("state").GetString());
        Assert.True(st.GetProperty("inDoubt").GetBoolean());
        Assert.Equal("in-doubt", st.GetProperty("lastMigration").GetString());
        long s0 = st.GetProperty("vcpus")[0].GetProperty("slices").GetInt64();
        Thread.Sleep(200);
        Assert.Equal(s0, Status(ctl).GetProperty("vcpus")[0].GetProperty("slices").GetInt64()); // stays paused
    }

    [Fact]
    public void Resolve_resume_after_an_in_doubt_migration_runs_the_vm_at_the_source_again()
    {
        string ctl = StartVm("vmr");
        // Not in doubt yet: resolve is refused and changes nothing.
        var (code0, out0) = VmigProcess.Run(TimeSpan.FromSeconds(30), "resolve", ctl, "--resume");
        Assert.Equal(1, code0);
        Assert.Contains("not in doubt", out0, StringComparison.Ordinal);

        MigrateIntoDoubt(ctl);
        // While in doubt nothing may move the state elsewhere.
        var again = VmigProcesses.Control(ctl, $"{{\"op\":\"migrate\",\"to\":\"tcp:127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}\"}}");
        Assert.Equal("error", again.GetProperty("event").GetString());
        Assert.Contains("in-doubt", again.GetProperty("message").GetString(), StringComparison.Ordinal);
        var snap = VmigProcesses.Control(ctl, $"{{\"op\":\"snapshot\",\"to\":\"{Path.Combine(_dir, "x.snap")}\"}}");
        Assert.Equal("error", snap.GetProperty("event").GetString());

        var (code, output) = VmigProcess.Run(TimeSpan.FromSeconds(30), "resolve", ctl, "--resume");
        Assert.True(code == 0, output);
        var st = Status(ctl);
        Assert.Equal("Running", st.GetProperty("state").GetString());
        Assert.False(st.GetProperty("inDoubt").GetBoolean());
        long s0 = st.GetProperty("vcpus")[0].GetProperty("slices").GetInt64();
        VmigProcesses.WaitFor(() => Status(ctl).GetProperty("vcpus")[0].GetProperty("slices").GetInt64() > s0 + 5, "vCPU runs again");
        var v = VmigProcesses.Control(ctl, "{\"op\":\"verify\"}").GetProperty("result");
        Assert.Equal(0, v.GetProperty("corrupt").GetInt64());
    }

    [Fact]
    public void Resolve_discard_after_an_in_doubt_migration_gives_the_source_up_and_its_process_exits()
    {
        string ctl = StartVm("vmd");
        MigrateIntoDoubt(ctl);
        var (bad, badOut) = VmigProcess.Run(TimeSpan.FromSeconds(30), "resolve", ctl, "--resume", "--discard");
        Assert.NotEqual(0, bad);
        Assert.Contains("exactly one", badOut, StringComparison.Ordinal);

        var (code, output) = VmigProcess.Run(TimeSpan.FromSeconds(30), "resolve", ctl, "--discard");
        Assert.True(code == 0, output);
        Assert.Contains("MigratedAway", output, StringComparison.Ordinal);
        VmigProcesses.WaitFor(() => !File.Exists(ctl), "the discarded VM's process exits and removes its control socket");
    }
}
