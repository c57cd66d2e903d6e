using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Vmig.Guest.Workloads;
using Vmig.Vmm;
using Vmig.Vmm.Migration;

namespace Vmig.Cli.Vm;

/// <summary>
/// The control socket of a running VM process (NAME.ctl): JSON lines. A request is one object with "op";
/// the answer is zero or more {"event":"progress",...} lines and one {"event":"done",...} or
/// {"event":"error","message":...} line. Ops: status, migrate, snapshot, verify, quit (docs/cli.md).
/// </summary>
internal sealed class VmControl : IDisposable
{
    private readonly Vmm.Vm _vm;
    private readonly ILogger _logger;
    private readonly Socket _listener;
    private readonly CancellationTokenSource _stop = new();
    private readonly object _opLock = new();

    public VmControl(Vmm.Vm vm, string socketPath, ILogger logger)
    {
        _vm = vm;
        _logger = logger;
        SocketPath = socketPath;
        Directory.CreateDirectory(Path.GetDirectoryName(socketPath)!);
        if (File.Exists(socketPath))
        {
            File.Delete(socketPath);
        }
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _listener.Bind(new UnixDomainSocketEndPoint(socketPath));
        _listener.Listen(8);
    }

    public string SocketPath { get; }

    /// <summary>Completes when a quit arrives or the VM migrated away (the process should then exit).</summary>
    public Task Finished => _finished.Task;

    private readonly TaskCompletionSource _finished = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public async Task RunAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket s;
            try
            {
                s = await _listener.AcceptAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }
            _ = Task.Run(() => ServeAsync(s));
        }
    }

    private async Task ServeAsync(Socket s)
    {
        using var stream = new NetworkStream(s, ownsSocket: true);
        using var reader = new StreamReader(stream, Encoding.UTF8);
        await using var writer = new StreamWriter(stream, new UTF8Encoding(false)) { AutoFlush = true, NewLine = "\n" };
        string? line;
        while ((line = await reader.ReadLineAsync().ConfigureAwait(false)) is not null)
        {
            JsonObject? req;
            try
            {
                req = JsonNode.Parse(line) as JsonObject;
            }
            catch (JsonException e)
            {
                await Send(writer, Error("malformed request: " + e.Message)).ConfigureAwait(false);
                continue;
            }
            string op = req?["op"]?.GetValue<string>() ?? "";
            JsonObject answer;
            try
            {
                answer = op switch
                {
                    "status" => Done(Status()),
                    "migrate" => await MigrateAsync(req!, writer).ConfigureAwait(false),
                    "snapshot" => Done(Snapshot(req!)),
                    "verify" => Done(Verify(req?["resume"]?.GetValue<bool>() ?? true)),
                    "resolve" => Done(Resolve(req?["action"]?.GetValue<string>())),
                    "quit" => Quit(),
                    _ => Error($"unknown op '{op}' (status, migrate, snapshot, verify, resolve, quit)"),
                };
            }
            catch (Exception e) when (e is IOException or InvalidOperationException or ArgumentException or TimeoutException or InvalidDataException or FormatException or SocketException)
            {
                answer = Error(e.Message);
            }
            await Send(writer, answer).ConfigureAwait(false);
            if (Volatile.Read(ref _finishAfterReply))
            {
                // Only now: the process exits once Finished completes, and the requester must get its answer first.
                _finished.TrySetResult();
            }
        }
    }

    private bool _finishAfterReply;

    private static Task Send(StreamWriter w, JsonObject o) => w.WriteLineAsync(o.ToJsonString());

    private static JsonObject Done(JsonNode? body) => new() { ["event"] = "done", ["result"] = body };

    private static JsonObject Error(string message) => new() { ["event"] = "error", ["message"] = message };

    private JsonObject Quit()
    {
        Volatile.Write(ref _finishAfterReply, true);
        return Done(null);
    }

    /// <summary>Outcome of the last migration ("completed", "rolled-back", "in-doubt", …; null if none ran).</summary>
    private volatile string? _lastMigration;

    /// <summary>The VM is paused after an in-doubt migration, until <c>resolve</c> (which records how it ended).</summary>
    private bool InDoubt => _lastMigration == "in-doubt";

    private void RefuseWhileInDoubt(string op)
    {
        if (InDoubt)
        {
            throw new InvalidOperationException($"{op}: VM {_vm.Name} is paused after an in-doubt migration; resolve it first (vmig resolve {_vm.Name} --resume|--discard)");
        }
    }

    /// <summary>
    /// Ends an in-doubt state: "resume" (the operator knows the target does not run the VM) resumes the source;
    /// "discard" (the target runs it) gives the source up, and the process exits as after a completed migration.
    /// </summary>
    private JsonNode Resolve(string? action)
    {
        lock (_opLock)
        {
            if (action is not ("resume" or "discard"))
            {
                throw new ArgumentException("resolve: 'action' must be \"resume\" or \"discard\"");
            }
            if (!InDoubt)
            {
                throw new InvalidOperationException($"resolve: VM {_vm.Name} is not in doubt (state {_vm.State}, last migration {_lastMigration ?? "none"})");
            }
            string? problem;
            if (action == "resume")
            {
                problem = MigrationRecovery.ResumeInDoubtSource(_vm);
                _lastMigration = "in-doubt, resolved: resumed at the source";
            }
            else
            {
                problem = MigrationRecovery.DiscardInDoubtSource(_vm);
                _lastMigration = "in-doubt, resolved: discarded at the source";
                Volatile.Write(ref _finishAfterReply, true);
            }
            _logger.LogWarning("in-doubt migration resolved by the operator: {Action}; state {State}", action, _vm.State);
            return new JsonObject { ["state"] = _vm.State.ToString(), ["problem"] = problem };
        }
    }

    private JsonNode Status() => new JsonObject
    {
        ["name"] = _vm.Name,
        ["state"] = _vm.State.ToString(),
        ["inDoubt"] = InDoubt,
        ["lastMigration"] = _lastMigration,
        ["memoryBytes"] = _vm.Memory.Size,
        ["pid"] = Environment.ProcessId,
        ["vcpus"] = new JsonArray(_vm.Vcpus.Select(v => (JsonNode)new JsonObject
        {
            ["index"] = v.Index,
            ["kind"] = v.Kind,
            ["slices"] = v.Slices,
            ["fault"] = v.Fault?.Message,
        }).ToArray()),
        ["devices"] = new JsonArray(_vm.Devices.Select(d => (JsonNode)new JsonObject
        {
            ["name"] = d.Description.Name,
            ["kind"] = d.Description.Kind,
            ["migrationFlags"] = d.Description.MigrationFlags.ToString(),
        }).ToArray()),
    };

    private async Task<JsonObject> MigrateAsync(JsonObject req, StreamWriter writer)
    {
        var endpoint = ParseTcp(req["to"]?.GetValue<string>() ?? throw new ArgumentException("migrate: 'to' (tcp:HOST:PORT) is required"));
        var tlsNode = req["tls"] as JsonObject;
        var options = new MigrationOptions
        {
            DowntimeLimit = TimeSpan.FromMilliseconds(req["downtimeLimitMs"]?.GetValue<double>() ?? 300),
            MaxBandwidth = req["maxBandwidth"]?.GetValue<long>() ?? 0,
            MaxRounds = req["maxRounds"]?.GetValue<int>() ?? 30,
            ParallelConnections = req["parallel"]?.GetValue<int>() ?? 1,
            Tls = tlsNode is null ? null : new MigrationTlsOptions
            {
                CertificatePath = tlsNode["cert"]?.GetValue<string>(),
                KeyPath = tlsNode["key"]?.GetValue<string>(),
                TrustedCertificatePath = tlsNode["ca"]?.GetValue<string>(),
                TargetHost = tlsNode["host"]?.GetValue<string>() ?? "localhost",
            },
        };
        var events = System.Threading.Channels.Channel.CreateUnbounded<MigrationProgress>();
        var progress = new SyncProgress(p => events.Writer.TryWrite(p));
        // The requester going away (Ctrl-C / SIGTERM of `vmig migrate`) cancels the migration: the source rolls back.
        using var cancel = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
        Task<MigrationReport> run;
        lock (_opLock)
        {
            // Under the lock, so a concurrent resolve cannot slip between the check and the start.
            RefuseWhileInDoubt("migrate");
            run = MigrationSource.RunAsync(_vm, endpoint, options, progress, cancel.Token);
        }
        _ = run.ContinueWith(_ => events.Writer.TryComplete(), TaskScheduler.Default);
        await foreach (var p in events.Reader.ReadAllAsync().ConfigureAwait(false))
        {
            if (cancel.IsCancellationRequested)
            {
                continue;
            }
            try
            {
                await SendProgress(writer, p).ConfigureAwait(false);
            }
            catch (IOException)
            {
                _logger.LogWarning("migration requester went away; cancelling the migration");
                await cancel.CancelAsync().ConfigureAwait(false);
            }
        }
        try
        {
            var report = await run.ConfigureAwait(false);
            _lastMigration = report.Outcome;
            Volatile.Write(ref _finishAfterReply, true);
            return Done(JsonNode.Parse(report.ToJson()));
        }
        catch (VmMigrationException e)
        {
            _lastMigration = e.Report.Outcome;
            var o = Error(e.Message);
            o["report"] = JsonNode.Parse(e.Report.ToJson());
            o["sourceRunning"] = _vm.State == VmRunState.Running;
            o["inDoubt"] = InDoubt;
            return o;
        }
        catch (OperationCanceledException)
        {
            return Error("migration cancelled");
        }
    }

    private static Task SendProgress(StreamWriter writer, MigrationProgress p) =>
            Send(writer, new JsonObject
            {
                ["event"] = "progress",
                ["t"] = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds(),
                ["phase"] = p.Phase.ToString(),
                ["round"] = p.Round,
                ["bytesSent"] = p.BytesSent,
                ["bytesRemaining"] = p.BytesRemaining,
                ["dirtyRate"] = p.DirtyRateBytesPerSecond,
                ["bandwidth"] = p.BandwidthBytesPerSecond,
                ["expectedDowntimeMs"] = p.ExpectedDowntime.TotalMilliseconds,
            });

    private JsonNode Snapshot(JsonObject req)
    {
        string path = req["to"]?.GetValue<string>() ?? throw new ArgumentException("snapshot: 'to' (a file path) is required");
        lock (_opLock)
        {
            RefuseWhileInDoubt("snapshot");
            using var f = File.Create(path);
            var report = VmSnapshot.Save(_vm, f);
            f.Flush(true);
            return JsonNode.Parse(report.ToJson())!;
        }
    }

    /// <summary>Pauses the guest, reads every acknowledged write back through the guest's own driver, checks the memory dirtier's pages.</summary>
    internal JsonNode Verify(bool resume)
    {
        lock (_opLock)
        {
            bool wasRunning = _vm.State == VmRunState.Running;
            _vm.Pause();
            try
            {
                long writes = 0, reads = 0, verified = 0, lost = 0, corrupt = 0, badPages = 0;
                foreach (var v in _vm.Vcpus)
                {
                    var regs = v.Registers;
                    if (v.Kind == "fio")
                    {
                        ulong gpa = FioWorkload.StateGpa(regs);
                        var dev = _vm.Guest.GetService<IGuestBlockDevice>(FioWorkload.DeviceName(_vm.Memory, gpa));
                        var c = FioWorkload.Verify(_vm.Memory, gpa, dev);
                        writes += c.Writes;
                        reads += c.Reads;
                        verified += c.Verified;
                        lost += c.Lost;
                        corrupt += c.Corrupt;
                    }
                    else if (v.Kind == "memory-dirtier")
                    {
                        badPages += MemoryDirtier.Verify(_vm.Memory, regs);
                    }
                    else if (v.Kind == "accel-mix")
                    {
                        var (_, _, bad) = AcceleratorJobMix.Counters(regs);
                        corrupt += (long)bad;
                    }
                }
                return new JsonObject
                {
                    ["writes"] = writes,
                    ["reads"] = reads,
                    ["verified"] = verified,
                    ["lost"] = lost,
                    ["corrupt"] = corrupt + badPages,
                    ["accelChecks"] = _vm.Vcpus.Where(v => v.Kind == "accel-mix").Sum(v => (long)AcceleratorJobMix.Counters(v.Registers).Ok),
                };
            }
            finally
            {
                if (resume && wasRunning)
                {
                    _vm.Resume();
                }
            }
        }
    }

    public static IPEndPoint ParseTcp(string spec)
    {
        // tcp:HOST:PORT (HOST may be an IPv4 address, "localhost" or a bracketed IPv6 address).
        if (!spec.StartsWith("tcp:", StringComparison.Ordinal))
        {
            throw new ArgumentException($"'{spec}' is not tcp:HOST:PORT");
        }
        string rest = spec[4..];
        int colon = rest.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(rest[(colon + 1)..], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int port) || port is < 1 or > 65535)
        {
            throw new ArgumentException($"'{spec}' is not tcp:HOST:PORT");
        }
        string host = rest[..colon].Trim('[', ']');
        var ip = host == "localhost" ? IPAddress.Loopback : IPAddress.TryParse(host, out var a) ? a : Dns.GetHostAddresses(host)[0];
        return new IPEndPoint(ip, port);
    }

    public void Dispose()
    {
        _stop.Cancel();
        _listener.Dispose();
        try
        {
            File.Delete(SocketPath);
        }
        catch (IOException)
        {
        }
        _stop.Dispose();
    }

    /// <summary>IProgress that calls back on the reporting thread (Progress&lt;T&gt; would post to the thread pool out of order).</summary>
    private sealed class SyncProgress(Action<MigrationProgress> report) : IProgress<MigrationProgress>
    {
        public void Report(MigrationProgress value) => report(value);
    }
}
