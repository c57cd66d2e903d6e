using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Vmig.Native;

namespace Vmig.Cli.Tests.Faults;

/// <summary>Where in the migration the fault lands (the source's progress phases; device pre-copy runs inside PreCopy rounds).</summary>
public enum FaultPhase
{
    Handshake,
    PreCopy,
    Switchover,
    StopCopy,
    WaitingForTarget,
}

/// <summary>What goes wrong.</summary>
public enum FaultKind
{
    KillSourceDeviceHost,
    KillTargetDeviceHost,
    KillTargetVmm,
    CutTcp,
    CorruptByte,
    StallTarget,
}

/// <summary>One case's result: one row of docs/fault-injection.md.</summary>
public sealed record FaultOutcome(
    FaultPhase Phase, FaultKind Fault, string InjectedDuring, string MigrateResult, string VmAt,
    long? Writes, long? Lost, long? Corrupt, string Leftovers, bool Pass, string Why)
{
    /// <summary>The source stayed paused after Commit because the target's result never arrived (then resolved by the harness as operator).</summary>
    public bool InDoubt { get; init; }

    /// <summary>The fault killed the VM itself: the target VMM was killed after the migration completed.</summary>
    public bool KilledTheVm => Fault == FaultKind.KillTargetVmm && MigrateResult == "completed";

    /// <summary>pass, in-doubt, degenerate or FAIL (docs/fault-injection.md says why each is what it is).</summary>
    public string Verdict => Pass ? (InDoubt ? "pass after resolve" : "pass") : KilledTheVm ? "degenerate" : "**FAIL**";

    public string ToRow() =>
        $"| {Phase} | {Fault} | {InjectedDuring} | {MigrateResult} | {VmAt} | {Fmt(Writes)} | {Fmt(Lost)} | {Fmt(Corrupt)} | {Leftovers} | {Verdict} | {Why.Replace("|", "/", StringComparison.Ordinal)} |";

    private static string Fmt(long? v) => v?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "—";
}

/// <summary>
/// One fault-injection case with real processes: `vmig host` ×2 (NVMe, one VF each, on a shared 16 MiB namespace file),
/// a 64 MiB VM with a verifying fio job and a memory dirtier on host A, `vmig vm --incoming` on host B behind a
/// <see cref="FaultProxy"/>; the migration is started through the source's control socket, the fault goes in on the
/// first progress event of the chosen phase, and the outcome is read back through the control sockets (status, verify).
/// </summary>
internal sealed class FaultScenario : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmig-fault-").FullName;
    private readonly List<(string Role, Process P)> _procs = [];
    private readonly HashSet<string> _sigkilled = [];
    private readonly StringBuilder _log = new();

    public string Log => _log.ToString();

    public void Dispose()
    {
        foreach (var (_, p) in _procs)
        {
            if (!p.HasExited)
            {
                p.Kill(true);
                p.WaitForExit(5000);
            }
            p.Dispose();
        }
        try
        {
            Directory.Delete(_dir, true);
        }
        catch (IOException)
        {
        }
    }

    private Process Start(string role, params string[] args)
    {
        var p = VmigProcess.Start(args);
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) { lock (_log) { _log.Append(role).Append(": ").AppendLine(e.Data); } } };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) { lock (_log) { _log.Append(role).Append(" !: ").AppendLine(e.Data); } } };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        _procs.Add((role, p));
        return p;
    }

    private Process Proc(string role) => _procs.First(x => x.Role == role).P;

    private static void WaitFor(Func<bool> cond, string what, int seconds = 60)
    {
        var sw = Stopwatch.StartNew();
        while (!cond())
        {
            if (sw.Elapsed > TimeSpan.FromSeconds(seconds))
            {
                throw new TimeoutException("timed out waiting for " + what);
            }
            Thread.Sleep(50);
        }
    }

    private string SrcCtl => Path.Combine(_dir, "vmA", "vm0.ctl");

    private string TgtCtl => Path.Combine(_dir, "vmB", "vm0.ctl");

    public FaultOutcome Run(FaultPhase phase, FaultKind fault)
    {
        NvmeTwoHosts.StartHosts(_dir, (h, cfg) => Start("host" + h, "host", "--config", cfg), (cond, what) => WaitFor(cond, what, 120));
        Start("vmA", "vm", "--config", NvmeTwoHosts.WriteVmConfig(_dir, "4M"));
        WaitFor(() => File.Exists(SrcCtl), "source control socket");
        int port = VmigProcess.FreePort();
        Start("vmB", "vm", "--incoming", $"tcp:127.0.0.1:{port}", "--name", "vm0", "--runtime-dir", Path.Combine(_dir, "vmB"),
            "--device", $"nvme0={NvmeTwoHosts.TargetVfSocket(_dir)}");
        WaitFor(() => Log.Contains("vmB: vm vm0: waiting for a migration", StringComparison.Ordinal), "incoming VM listening");
        using var proxy = new FaultProxy(new IPEndPoint(IPAddress.Loopback, port));
        Thread.Sleep(1000); // let fio acknowledge some writes first

        // Early phases run throttled so the fault lands inside them; late phases run unthrottled so pre-copy converges.
        long bw = phase is FaultPhase.Handshake or FaultPhase.PreCopy ? 4L << 20 : 0;
        string injectedDuring = "not injected";
        if (phase == FaultPhase.Handshake && fault is FaultKind.CutTcp or FaultKind.CorruptByte or FaultKind.StallTarget)
        {
            // Deterministic: armed before the first byte, so it hits the stream header / hello / reply.
            Inject(fault, proxy, 9);
            injectedDuring = "Handshake (armed before connect)";
        }

        using var c = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        c.Connect(new UnixDomainSocketEndPoint(SrcCtl));
        using var s = new NetworkStream(c);
        using var w = new StreamWriter(s) { AutoFlush = true, NewLine = "\n" };
        using var r = new StreamReader(s);
        var req = new JsonObject { ["op"] = "migrate", ["to"] = $"tcp:127.0.0.1:{proxy.Port}" };
        if (bw > 0)
        {
            req["maxBandwidth"] = bw;
        }
        w.WriteLine(req.ToJsonString());
        c.ReceiveTimeout = 150_000;
        JsonObject? final = null;
        var phases = new List<string>();
        try
        {
            while (r.ReadLine() is string line)
            {
                var o = (JsonObject)JsonNode.Parse(line)!;
                string ev = o["event"]!.GetValue<string>();
                if (ev == "progress")
                {
                    string ph = o["phase"]!.GetValue<string>();
                    if (phases.Count == 0 || phases[^1] != ph)
                    {
                        phases.Add(ph);
                    }
                    if (injectedDuring == "not injected" && ph == phase.ToString())
                    {
                        Inject(fault, proxy, phase == FaultPhase.PreCopy ? 65_536 + 123 : 1_000);
                        injectedDuring = $"{ph} r{o["round"]}, {proxy.BytesToTarget >> 10} KiB through the proxy";
                    }
                    continue;
                }
                final = o;
                break;
            }
        }
        catch (IOException e)
        {
            _log.AppendLine("control read: " + e.Message);
        }
        string migrateResult = final is null ? "no answer" : final["event"]!.GetValue<string>() == "done" ? "completed" : "error: " + Short(final["message"]?.GetValue<string>());
        long streamTotal = proxy.BytesToTarget;
        if (injectedDuring != "not injected" && !injectedDuring.StartsWith("Handshake (armed", StringComparison.Ordinal))
        {
            injectedDuring += $" of {streamTotal >> 10} KiB";
        }
        _log.AppendLine("phases seen: " + string.Join(",", phases) + "; final: " + final?.ToJsonString());
        if (fault == FaultKind.CorruptByte)
        {
            _log.AppendLine($"corrupted byte: {proxy.CorruptedDirection} offset {proxy.CorruptedAt}");
            injectedDuring += proxy.CorruptedAt < 0 ? " (no byte crossed afterwards)" : $" (flipped {proxy.CorruptedDirection} byte {proxy.CorruptedAt})";
        }

        // Let both sides settle: a completed source exits; a failed target discards and exits.
        var src = Proc("vmA");
        var tgt = Proc("vmB");
        if (migrateResult == "completed")
        {
            src.WaitForExit(20_000);
        }
        else
        {
            var sw = Stopwatch.StartNew();
            while (!tgt.HasExited && sw.Elapsed < TimeSpan.FromSeconds(75) && Status(TgtCtl) != "Running")
            {
                Thread.Sleep(200);
            }
        }
        Thread.Sleep(300);
        string? srcState = src.HasExited ? null : Status(SrcCtl);
        string? tgtState = tgt.HasExited ? null : Status(TgtCtl);
        // In doubt (docs/fault-injection.md): Commit went out, the target's result did not come back. The harness acts
        // as the operator: it looks at the target and resolves the source with `resolve` (discard if the target runs,
        // resume otherwise); the case is then judged on the outcome, and the row says it needed the operator.
        bool wasInDoubt = migrateResult.Contains("in doubt", StringComparison.Ordinal) && srcState == "Paused";
        string resolved = "";
        if (wasInDoubt)
        {
            string action = tgtState == "Running" ? "discard" : "resume";
            var answer = Request(SrcCtl, $"{{\"op\":\"resolve\",\"action\":\"{action}\"}}", 30_000);
            resolved = $"in doubt (target {tgtState ?? "gone"}), operator resolve --{action}: {answer?["event"]?.GetValue<string>() ?? "no answer"}";
            _log.AppendLine(resolved);
            if (action == "discard")
            {
                src.WaitForExit(20_000);
            }
            Thread.Sleep(300);
            srcState = src.HasExited ? null : Status(SrcCtl);
        }
        bool srcRuns = srcState == "Running", tgtRuns = tgtState == "Running";
        string vmAt = (srcRuns, tgtRuns) switch
        {
            (true, true) => "BOTH",
            (true, false) => "source",
            (false, true) => "target",
            _ => "nowhere",
        };
        vmAt += $" (src {srcState ?? (src.HasExited ? $"exit {src.ExitCode}" : "?")}, tgt {tgtState ?? (tgt.HasExited ? $"exit {ExitText(tgt)}" : "?")})";

        // Verify on the survivor when the device host it depends on is alive.
        long? writes = null, lost = null, corrupt = null;
        string why = "";
        string survivorCtl = srcRuns ? SrcCtl : TgtCtl;
        string survivorHost = srcRuns ? "hostA" : "hostB";
        if (srcRuns != tgtRuns)
        {
            if (Proc(survivorHost).HasExited)
            {
                why = $"survivor's device host ({survivorHost}) was killed: verify skipped; vCPU faults: {VcpuFaults(survivorCtl)}";
            }
            else
            {
                var v = Verify(survivorCtl);
                if (v is null)
                {
                    why = "verify gave no answer";
                }
                else
                {
                    writes = v["writes"]!.GetValue<long>();
                    lost = v["lost"]!.GetValue<long>();
                    corrupt = v["corrupt"]!.GetValue<long>();
                }
            }
        }

        string leftovers = Teardown();
        bool exactlyOne = srcRuns != tgtRuns;
        bool checksOk = writes is null ? why.StartsWith("survivor's device host", StringComparison.Ordinal) : writes > 0 && lost == 0 && corrupt == 0;
        bool pass = exactlyOne && checksOk && leftovers == "none";
        // A source in doubt is only acceptable for faults that can lose the target's result after Commit: a dead target
        // VMM, a cut or a stalled connection. A corrupted byte or a dead device host must end in a clean rollback.
        bool inDoubt = wasInDoubt;
        if (inDoubt && fault is not (FaultKind.KillTargetVmm or FaultKind.CutTcp or FaultKind.StallTarget))
        {
            pass = false;
        }
        if (why.Length == 0)
        {
            why = !exactlyOne ? "the VM must run in exactly one place" : !checksOk ? "verifier found damage" : leftovers != "none" ? "leftovers" : "";
        }
        // A source whose own device host was killed must not have handed a half-migrated VM to the target.
        if (fault == FaultKind.KillSourceDeviceHost && vmAt.StartsWith("target", StringComparison.Ordinal) && phase is FaultPhase.Handshake or FaultPhase.PreCopy)
        {
            pass = false;
            why = "migration completed after the source's device host died before stop-copy";
        }
        if (inDoubt)
        {
            why = resolved + (why.Length > 0 ? "; " + why : "");
        }
        return new FaultOutcome(phase, fault, injectedDuring, migrateResult, vmAt, writes, lost, corrupt, leftovers, pass, why) { InDoubt = inDoubt };
    }

    private static string ExitText(Process p) => p.ExitCode == 137 || p.ExitCode == -1 ? "SIGKILL" : p.ExitCode.ToString(System.Globalization.CultureInfo.InvariantCulture);

    private static string Short(string? m) => m is null ? "" : m.Length > 110 ? m[..110] + "…" : m;

    private void Inject(FaultKind fault, FaultProxy proxy, long corruptAt)
    {
        _log.AppendLine($"inject {fault}");
        switch (fault)
        {
            case FaultKind.KillSourceDeviceHost:
                Kill9("hostA");
                break;
            case FaultKind.KillTargetDeviceHost:
                Kill9("hostB");
                break;
            case FaultKind.KillTargetVmm:
                Kill9("vmB");
                break;
            case FaultKind.CutTcp:
                proxy.Cut();
                break;
            case FaultKind.CorruptByte:
                proxy.CorruptAfter(corruptAt);
                break;
            case FaultKind.StallTarget:
                proxy.Stall();
                break;
        }
    }

    private void Kill9(string role)
    {
        var p = Proc(role);
        _sigkilled.Add(role);
        ProcessSignals.Send(p.Id, ProcessSignals.SIGKILL);
        p.WaitForExit(10_000);
    }

    /// <summary>Stops what still runs (VMs by quit, hosts by SIGTERM), then checks no process and no socket is left.</summary>
    private string Teardown()
    {
        var problems = new List<string>();
        foreach (var (role, ctl) in new[] { ("vmA", SrcCtl), ("vmB", TgtCtl) })
        {
            var p = Proc(role);
            if (!p.HasExited && !File.Exists(ctl))
            {
                // An incoming VM that never got a connection is still waiting for one (that is its job): SIGTERM ends it.
                ProcessSignals.Send(p.Id, ProcessSignals.SIGTERM);
                p.WaitForExit(10_000);
            }
            if (!p.HasExited)
            {
                Request(ctl, "{\"op\":\"quit\"}", 10_000);
                if (!p.WaitForExit(15_000))
                {
                    problems.Add(role + " ignored quit");
                    ProcessSignals.Send(p.Id, ProcessSignals.SIGTERM);
                    p.WaitForExit(10_000);
                }
            }
        }
        foreach (string role in new[] { "hostA", "hostB" })
        {
            var p = Proc(role);
            if (!p.HasExited)
            {
                ProcessSignals.Send(p.Id, ProcessSignals.SIGTERM);
                if (!p.WaitForExit(15_000))
                {
                    problems.Add(role + " ignored SIGTERM");
                }
            }
        }
        foreach (var (role, p) in _procs)
        {
            if (!p.HasExited || Directory.Exists($"/proc/{p.Id}"))
            {
                problems.Add($"{role} pid {p.Id} still alive");
                p.Kill(true);
            }
        }
        // A SIGKILLed process cannot unlink its sockets; only those stale files are excused.
        var excused = _sigkilled.Select(r => Path.Combine(_dir, r switch { "hostA" => "A", "hostB" => "B", _ => r })).ToList();
        foreach (string f in Directory.EnumerateFiles(_dir, "*", SearchOption.AllDirectories))
        {
            if ((f.EndsWith(".sock", StringComparison.Ordinal) || f.EndsWith(".ctl", StringComparison.Ordinal)) && !excused.Any(d => f.StartsWith(d + "/", StringComparison.Ordinal)))
            {
                problems.Add("left " + Path.GetRelativePath(_dir, f));
            }
        }
        return problems.Count == 0 ? "none" : string.Join("; ", problems);
    }

    private static string? Status(string ctl)
    {
        var o = Request(ctl, "{\"op\":\"status\"}", 10_000);
        return o?["result"]?["state"]?.GetValue<string>();
    }

    private static string VcpuFaults(string ctl)
    {
        var o = Request(ctl, "{\"op\":\"status\"}", 10_000);
        var faults = (o?["result"]?["vcpus"] as JsonArray)?.Select(v => v?["fault"]?.GetValue<string>()).Where(f => f is not null).ToList();
        return faults is null ? "status unavailable" : faults.Count == 0 ? "none" : Short(string.Join(" / ", faults));
    }

    private static JsonObject? Verify(string ctl) => Request(ctl, "{\"op\":\"verify\"}", 60_000)?["result"] as JsonObject;

    private static JsonObject? Request(string ctl, string json, int timeoutMs)
    {
        if (!File.Exists(ctl))
        {
            return null;
        }
        try
        {
            using var c = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            c.Connect(new UnixDomainSocketEndPoint(ctl));
            c.ReceiveTimeout = timeoutMs;
            using var s = new NetworkStream(c);
            using var w = new StreamWriter(s) { AutoFlush = true, NewLine = "\n" };
            using var r = new StreamReader(s);
            w.WriteLine(json);
            while (r.ReadLine() is string line)
            {
                var o = JsonNode.Parse(line) as JsonObject;
                if (o?["event"]?.GetValue<string>() is "done" or "error")
                {
                    return o;
                }
            }
        }
        catch (Exception e) when (e is IOException or SocketException or JsonException)
        {
        }
        return null;
    }
}
