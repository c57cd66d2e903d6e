using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using Vmig.Migration;
using Vmig.Native;
using Vmig.VfioUser;
using Vmig.VfioUser.Client;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Conformance;

/// <summary>
/// Checks any vfio-user server that advertises migration against the spec (qemu docs/interop/vfio-user.rst) and the
/// VFIO migration v2 UAPI as vfio-user carries it (reference §1-§3): negotiation, feature probing, the next-step
/// result of every from/to pair for the advertised flags, which arcs open and close a data stream, MIG_DATA
/// semantics, command gating per state, reset, dirty-logging bitmaps, DEVICE_FEATURE argsz/flag validation, and
/// resilience to malformed messages. The device is driven back to RUNNING (DEVICE_RESET, then SET RUNNING) between
/// checks. Expected results come from <see cref="ExpectedTransitions"/>, typed independently of Vmig.Migration.
/// </summary>
public static class ConformanceSuite
{
    /// <summary>Runs every check against the server listening on <paramref name="socketPath"/>.</summary>
    /// <remarks>The server must accept a new client after the previous one disconnects (the suite reconnects between
    /// sections). A server that cannot be reached at all yields a report with one failed "negotiation.connect" check.</remarks>
    public static ConformanceReport Run(string socketPath, ConformanceOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(socketPath);
        using var r = new SuiteRun(socketPath, options ?? new ConformanceOptions());
        return r.Execute();
    }
}

/// <summary>One run of the suite: its client, raw peer and the checks recorded so far.</summary>
internal sealed partial class SuiteRun : IDisposable
{
    private const string SpecVersion = "vfio-user.rst \"Version\"";
    private const string SpecHeader = "vfio-user.rst \"Header\"";
    private const string SpecFeature = "vfio-user.rst \"VFIO_USER_DEVICE_FEATURE\"; vfio.h VFIO_DEVICE_FEATURE (reference §2.6)";
    private const string SpecFsm = "vfio.h vfio_device_mig_state; vfio_main.c vfio_mig_get_next_state (reference §1.4-§1.6)";
    private const string SpecMigData = "vfio-user.rst \"VFIO_USER_MIG_DATA_READ/WRITE\" (reference §3.5); vfio.h data_fd (§2.1-§2.2)";
    private const string SpecReset = "vfio.h VFIO_DEVICE_RESET returns the state to RUNNING (reference §2.5; ARCHITECTURE §6)";
    private const string SpecGating = "libvfio-user should_exec_command (reference §3.6); vfio.h STOP must answer config space (§1.1)";
    private const string SpecLogging = "vfio.h DMA_LOGGING_START/STOP/REPORT (reference §2.8, §3.4)";
    private const uint DeviceStateFeature = 2;

    private readonly string _path;
    private readonly ConformanceOptions _o;
    private readonly List<CheckResult> _checks = [];
    private VfioUserClient? _client;
    private MigrationFlags _flags;
    private uint _serverMaxXfer = VfioUserCapabilities.DefaultMaxDataXferSize;
    private byte[]? _validStream;

    public SuiteRun(string path, ConformanceOptions options)
    {
        _path = path;
        _o = options;
    }

    private VfioUserClient C => _client ?? throw new InvalidOperationException("not connected");

    public ConformanceReport Execute()
    {
        var started = DateTimeOffset.UtcNow;
        var sw = Stopwatch.StartNew();
        ulong? flags = null;
        Negotiation();
        if (Connect(out string? why))
        {
            _serverMaxXfer = C.ServerCapabilities.MaxDataXferSize;
            if (Features())
            {
                flags = (ulong)_flags;
                Transitions();
                Data();
                Reset();
                Gating();
                DirtyLogging();
            }
            Validation();
        }
        else
        {
            Record("negotiation.client-connect", "negotiation", CheckOutcome.Fail, "typed client could not attach: " + why, SpecVersion, 0);
        }
        Resilience();
        return new ConformanceReport(_path, started, sw.Elapsed, flags, _checks);
    }

    public void Dispose() => _client?.Dispose();

    // ---------------------------------------------------------------- plumbing

    private void Record(string id, string category, CheckOutcome outcome, string reason, string clause, double ms)
    {
        var c = new CheckResult(id, category, outcome, reason, clause, ms);
        _checks.Add(c);
        _o.Progress?.Invoke(c);
    }

    /// <summary>Runs <paramref name="body"/> as one check; an exception fails it with its message.</summary>
    private void Check(string id, string category, string clause, Func<(CheckOutcome Outcome, string Reason)> body)
    {
        var sw = Stopwatch.StartNew();
        (CheckOutcome o, string reason) res;
        try
        {
            res = body();
        }
        catch (Exception e) when (e is VfioUserException or IOException or TimeoutException or SocketException or InvalidOperationException
            or NativeException or InvalidDataException or ArgumentException or ObjectDisposedException)
        {
            // Whatever the server does, the suite records a failed check and goes on.
            res = (CheckOutcome.Fail, $"{e.GetType().Name}: {e.Message}");
        }
        Record(id, category, res.o, res.reason, clause, sw.Elapsed.TotalMilliseconds);
    }

    private static (CheckOutcome, string) Pass(string reason) => (CheckOutcome.Pass, reason);

    private static (CheckOutcome, string) Fail(string reason) => (CheckOutcome.Fail, reason);

    private static (CheckOutcome, string) Skip(string reason) => (CheckOutcome.Skip, reason);

    private bool Connect(out string? why)
    {
        _client?.Dispose();
        _client = null;
        why = null;
        var deadline = Environment.TickCount64 + Math.Max(_o.TimeoutMs, 2000);
        var opts = new VfioUserClientOptions { RequestExtensions = _o.RequestExtensions, TimeoutMs = _o.TimeoutMs };
        while (true)
        {
            try
            {
                _client = VfioUserClient.Connect(_path, opts);
                return true;
            }
            catch (Exception e) when (e is VfioUserException or SocketException or NativeException or IOException)
            {
                // The server takes one client at a time and may not have seen our previous close yet.
                why = e.Message;
                if (Environment.TickCount64 > deadline)
                {
                    return false;
                }
                Thread.Sleep(20);
            }
        }
    }

    private RawPeer? ConnectRaw(bool negotiate, out string? why)
    {
        _client?.Dispose();
        _client = null;
        why = null;
        var deadline = Environment.TickCount64 + Math.Max(_o.TimeoutMs, 2000);
        while (true)
        {
            RawPeer? p = null;
            try
            {
                p = RawPeer.Connect(_path);
                if (!negotiate)
                {
                    return p;
                }
                var r = p.Negotiate(_o.TimeoutMs);
                if (r is { IsSuccess: true })
                {
                    return p;
                }
                why = r is null ? "closed during VERSION" : $"VERSION refused: errno {r.Errno}";
            }
            catch (Exception e) when (e is SocketException or NativeException or IOException or TimeoutException)
            {
                why = e.Message;
            }
            p?.Dispose();
            if (Environment.TickCount64 > deadline)
            {
                return null;
            }
            Thread.Sleep(20);
        }
    }

    /// <summary>
    /// Runs <paramref name="act"/> on a fresh connection without VERSION. A server takes one client at a time and may
    /// still be releasing our previous one (it then closes the new connection at once), so a close is retried a few
    /// times; a reply is returned as soon as one comes. Null: the server closed the connection every time.
    /// </summary>
    private RawMessage? OnFreshConnection(Func<RawPeer, RawMessage?> act)
    {
        _client?.Dispose();
        _client = null;
        for (int attempt = 0; attempt < 5; attempt++)
        {
            try
            {
                using var p = RawPeer.Connect(_path);
                var r = act(p);
                if (r is not null)
                {
                    return r;
                }
            }
            catch (Exception e) when (e is NativeException or SocketException or IOException)
            {
            }
            Thread.Sleep(50);
        }
        return null;
    }

    /// <summary>Sends a DEVICE_FEATURE payload through the typed client; 0 or the errno.</summary>
    private int Feature(byte[] payload, out byte[] reply)
    {
        reply = [];
        try
        {
            using var r = C.SendRaw(VfioUserCommand.DeviceFeature, payload);
            reply = r.Payload.ToArray();
            return 0;
        }
        catch (VfioUserException e) when (e is not VfioUserConnectionClosedException)
        {
            return e.Errno;
        }
    }

    private int Send(VfioUserCommand cmd, byte[] payload, out byte[] reply)
    {
        reply = [];
        try
        {
            using var r = C.SendRaw(cmd, payload);
            reply = r.Payload.ToArray();
            return 0;
        }
        catch (VfioUserException e) when (e is not VfioUserConnectionClosedException)
        {
            return e.Errno;
        }
    }

    private int SetState(uint target)
    {
        var d = new byte[8];
        BinaryPrimitives.WriteUInt32LittleEndian(d, target);
        BinaryPrimitives.WriteInt32LittleEndian(d.AsSpan(4), -1);
        return Feature(RawPeer.FeaturePayload(16, DeviceFeatureHead.Set | DeviceStateFeature, d), out _);
    }

    private int GetState()
    {
        int e = Feature(RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | DeviceStateFeature), out var r);
        return e != 0 ? -e : r.Length < 12 ? -Errno.EPROTO : (int)BinaryPrimitives.ReadUInt32LittleEndian(r.AsSpan(8));
    }

    private static string Name(uint s) => s switch
    {
        0 => "ERROR",
        1 => "STOP",
        2 => "RUNNING",
        3 => "STOP_COPY",
        4 => "RESUMING",
        5 => "RUNNING_P2P",
        6 => "PRE_COPY",
        7 => "PRE_COPY_P2P",
        _ => s.ToString(System.Globalization.CultureInfo.InvariantCulture),
    };

    private static string Name(DeviceState s) => Name((uint)s);

    private static string StateText(int s) => s < 0 ? $"errno {-s}" : Name((uint)s);

    private static string FlagsName(MigrationFlags f) => f switch
    {
        MigrationFlags.StopCopy => "SC",
        MigrationFlags.StopCopy | MigrationFlags.P2P => "SC|P2P",
        MigrationFlags.StopCopy | MigrationFlags.PreCopy => "SC|PRE",
        MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy => "SC|P2P|PRE",
        _ => "0x" + ((ulong)f).ToString("x", System.Globalization.CultureInfo.InvariantCulture),
    };

    /// <summary>DEVICE_RESET, then SET RUNNING if the reset did not get there; true when GET says RUNNING.</summary>
    private bool ToRunning(out string why)
    {
        why = "";
        int e = Send(VfioUserCommand.DeviceReset, [], out _);
        int s = GetState();
        if (s != (int)DeviceState.Running)
        {
            int e2 = SetState((uint)DeviceState.Running);
            s = GetState();
            if (s != (int)DeviceState.Running)
            {
                why = $"cannot return to RUNNING (reset errno {e}, SET RUNNING errno {e2}, GET {StateText(s)})";
                return false;
            }
        }
        return true;
    }

    /// <summary>Probes the data gate without consuming data: MIG_DATA_READ of 0 bytes (0 or errno).</summary>
    private int ProbeRead() => Send(VfioUserCommand.MigDataRead, MigHead(MigDataHead.WireSize, 0), out _);

    /// <summary>MIG_DATA_WRITE of 0 bytes (0 or errno).</summary>
    private int ProbeWrite() => Send(VfioUserCommand.MigDataWrite, MigHead(MigDataHead.WireSize, 0), out _);

    private static byte[] MigHead(uint argsz, uint size)
    {
        var b = new byte[MigDataHead.WireSize];
        new MigDataHead(argsz, size).WriteTo(b);
        return b;
    }

    /// <summary>Reads the save stream with requests of <paramref name="chunk"/> bytes until a short reply. Null (and why) if it
    /// did not end within <see cref="ConformanceOptions.MaxStreamBytes"/> or a read failed.</summary>
    private byte[]? ReadToShort(int chunk, out string why, out int reads)
    {
        why = "";
        reads = 0;
        using var ms = new MemoryStream();
        while (true)
        {
            int n;
            try
            {
                n = C.ReadMigrationData(chunk, ms);
            }
            catch (VfioUserException e) when (e is not VfioUserConnectionClosedException)
            {
                why = $"MIG_DATA_READ failed after {ms.Length} bytes: errno {e.Errno}";
                return null;
            }
            reads++;
            if (n < chunk)
            {
                return ms.ToArray();
            }
            if (ms.Length > _o.MaxStreamBytes)
            {
                why = $"stream did not end within {_o.MaxStreamBytes} bytes (every read was full)";
                return null;
            }
        }
    }

    /// <summary>RUNNING → RESUMING, writes <paramref name="stream"/>, RESUMING → STOP. Returns 0 or the errno of the failing step
    /// (the write's or the commit's); <paramref name="step"/> says which.</summary>
    private int Load(byte[] stream, out string step)
    {
        step = "SET RESUMING";
        int e = SetState((uint)DeviceState.Resuming);
        if (e != 0)
        {
            return e;
        }
        step = "MIG_DATA_WRITE";
        try
        {
            C.WriteMigrationData(stream);
        }
        catch (VfioUserException ex) when (ex is not VfioUserConnectionClosedException)
        {
            return ex.Errno;
        }
        step = "RESUMING->STOP";
        return SetState((uint)DeviceState.Stop);
    }

    // ---------------------------------------------------------------- negotiation (raw)

    private void Negotiation()
    {
        RawPeer? p = null;
        Check("negotiation.command-before-version", "negotiation", SpecVersion + ": the client sends VERSION first", () =>
        {
            var info = new byte[DeviceInfoPayload.WireSize];
            new DeviceInfoPayload(DeviceInfoPayload.WireSize, 0, 0, 0).WriteTo(info);
            var r = OnFreshConnection(q => q.Request(VfioUserCommand.DeviceGetInfo, info, _o.TimeoutMs));
            if (r is null)
            {
                return Pass("connection closed (allowed)");
            }
            return r.Header.IsError ? Pass($"refused with errno {r.Errno}") : Fail("DEVICE_GET_INFO before VERSION was answered");
        });
        Check("negotiation.version", "negotiation", SpecVersion, () =>
        {
            RawMessage? r = null;
            for (int attempt = 0; attempt < 5 && r is null; attempt++)
            {
                p?.Dispose();
                p = ConnectRaw(false, out _);
                r = p?.Negotiate(_o.TimeoutMs, """{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"pgsizes":4096}}""", minor: 0);
                if (r is null)
                {
                    // Closed at once: the server may still hold our previous connection (one client at a time).
                    Thread.Sleep(50);
                }
            }
            if (p is null)
            {
                return Fail("cannot connect");
            }
            if (r is not { IsSuccess: true })
            {
                return Fail(r is null ? "connection closed" : $"VERSION refused: errno {r.Errno}");
            }
            if (!VersionHead.TryRead(r.Payload, out var v) || v.Major != 0 || v.Minor > 0)
            {
                return Fail($"reply version {v.Major}.{v.Minor} to our 0.0 (must be the same major, minor ≤ ours)");
            }
            int e = VfioUserCapabilities.TryParse(r.Payload.AsSpan(VersionHead.Size), out var caps, out string? bad);
            if (e != 0)
            {
                return Fail("reply capabilities: " + bad);
            }
            if (caps.TwinSocketSupported)
            {
                return Fail("reply offers twin_socket, which we did not propose (reply must be a subset)");
            }
            if (caps.MaxDataXferSize < 4096)
            {
                return Fail($"max_data_xfer_size {caps.MaxDataXferSize} is too small to carry anything");
            }
            return Pass($"0.{v.Minor}; max_msg_fds {caps.MaxMsgFds}, max_data_xfer_size {caps.MaxDataXferSize}, pgsizes 0x{caps.PgSizes:x}");
        });
        Check("negotiation.version-twice", "negotiation", SpecVersion + ": negotiated once per connection", () =>
        {
            if (p is null)
            {
                return Skip("no negotiated connection");
            }
            var r = p.Negotiate(_o.TimeoutMs);
            if (r is null)
            {
                p.Dispose();
                p = null;
                return Pass("connection closed (allowed)");
            }
            if (!r.Header.IsError)
            {
                return Fail("a second VERSION was accepted");
            }
            int s = p.GetState(_o.TimeoutMs);
            return s == int.MinValue ? Fail("server closed after refusing") : Pass($"refused with errno {r.Errno}; next request answered");
        });
        p?.Dispose();
        foreach (var (id, json, what) in new (string, string, string)[]
        {
            ("negotiation.malformed-json", "{\"capabilities\":{\"max_msg_fds\":", "truncated JSON"),
            ("negotiation.wrong-type", "{\"capabilities\":{\"max_msg_fds\":\"many\"}}", "max_msg_fds is a string"),
            ("negotiation.not-an-object", "[1,2,3]", "JSON array instead of an object"),
        })
        {
            Check(id, "negotiation", SpecVersion + ": a side that cannot agree refuses", () =>
            {
                var r = OnFreshConnection(q => q.Request(VfioUserCommand.Version, RawPeer.VersionPayload(0, 0, json), _o.TimeoutMs));
                if (r is null)
                {
                    return Pass($"{what}: connection closed");
                }
                return r.Header.IsError ? Pass($"{what}: refused with errno {r.Errno}") : Fail($"{what} was accepted");
            });
        }
        Check("negotiation.major-mismatch", "negotiation", SpecVersion + ": the reply carries the same major", () =>
        {
            var r = OnFreshConnection(q => q.Request(VfioUserCommand.Version, RawPeer.VersionPayload(7, 0, "{}"), _o.TimeoutMs));
            if (r is null || r.Header.IsError)
            {
                return Pass(r is null ? "connection closed" : $"refused with errno {r.Errno}");
            }
            return VersionHead.TryRead(r.Payload, out var v) && v.Major == 7 ? Pass("server speaks major 7") : Fail($"answered major {v.Major} to a proposal of 7");
        });
    }

    // ---------------------------------------------------------------- features

    private bool Features()
    {
        bool migration = false;
        Check("features.probe-migration", "features", SpecFeature + "; reference §3.4 PROBE example", () =>
        {
            int e = Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | DeviceFeatureHead.Get | 1), out var r);
            if (e != 0)
            {
                return Fail($"PROBE GET MIGRATION: errno {e} (the server must advertise migration)");
            }
            return r.Length == 8 ? Pass("PROBE answered with an echo") : Fail($"PROBE reply is {r.Length} bytes, expected the 8-byte echo");
        });
        Check("features.migration-flags", "features", "vfio.h VFIO_DEVICE_FEATURE_MIGRATION (reference §1.2)", () =>
        {
            int e = Feature(RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | 1), out var r);
            if (e != 0)
            {
                return Fail($"GET MIGRATION: errno {e}");
            }
            if (r.Length < 16 || BinaryPrimitives.ReadUInt32LittleEndian(r) != 16)
            {
                return Fail($"GET reply {r.Length} bytes / argsz {(r.Length >= 4 ? BinaryPrimitives.ReadUInt32LittleEndian(r) : 0)}, expected 16/16");
            }
            _flags = (MigrationFlags)BinaryPrimitives.ReadUInt64LittleEndian(r.AsSpan(8));
            if (!ExpectedTransitions.IsDefined(_flags))
            {
                return Fail($"flags {FlagsName(_flags)} are not one of SC, SC|P2P, SC|PRE, SC|P2P|PRE");
            }
            migration = true;
            return Pass("flags " + FlagsName(_flags) + (C.SupportsP2P || (_flags & MigrationFlags.P2P) == 0 ? "" : " (P2P without the negotiated extension)"));
        });
        if (!migration)
        {
            return false;
        }
        Check("features.p2p-only-when-negotiated", "features", "vfio-user.rst: RUNNING_P2P/PRE_COPY_P2P are not used; vmig extension negotiated in VERSION", () =>
        {
            if (!_o.RequestExtensions && (_flags & MigrationFlags.P2P) != 0)
            {
                return Fail("P2P advertised to a client that did not ask for the extension");
            }
            return Pass(C.SupportsP2P ? "P2P extension negotiated" : "P2P not visible");
        });
        Check("features.probe-device-state", "features", SpecFeature, () =>
        {
            int e = Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | DeviceFeatureHead.Get | DeviceFeatureHead.Set | DeviceStateFeature), out _);
            return e == 0 ? Pass("GET|SET supported") : Fail($"PROBE GET|SET MIG_DEVICE_STATE: errno {e}");
        });
        Check("features.initial-state", "features", "libvfio-user and QEMU assume RUNNING (libvfio-user #779; ARCHITECTURE §6)", () =>
        {
            int s = GetState();
            return s == (int)DeviceState.Running ? Pass("RUNNING") : Fail($"initial state {StateText(s)}");
        });
        Check("features.probe-migration-set-refused", "features", SpecFeature + ": MIGRATION is GET only", () =>
        {
            int e = Feature(RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | DeviceFeatureHead.Set | 1), out _);
            return e == Errno.EINVAL ? Pass("EINVAL") : Fail(e == 0 ? "PROBE SET MIGRATION accepted" : $"errno {e}, expected EINVAL");
        });
        return true;
    }

    // ---------------------------------------------------------------- transitions

    private void Transitions()
    {
        string fl = FlagsName(_flags);
        // Leaving RESUMING commits what was written, and a device may rightly refuse an empty load: every pair that
        // starts in RESUMING first writes a genuine stream read from this device.
        _validStream = null;
        if (ToRunning(out _) && SetState((uint)DeviceState.StopCopy) == 0)
        {
            _validStream = ReadToShort(C.MaxMigrationChunk, out _, out _);
        }
        foreach (var from in ExpectedTransitions.States(_flags))
        {
            for (uint to = 0; to <= 8; to++)
            {
                uint target = to;
                Check($"transition.{fl}.{Name(from)}->{Name(target)}", "transitions", SpecFsm, () => Transition(from, target));
            }
        }
    }

    private (CheckOutcome, string) Transition(DeviceState from, uint to)
    {
        if (!ToRunning(out string why))
        {
            return Fail(why);
        }
        if (from != DeviceState.Running)
        {
            int e0 = SetState((uint)from);
            if (e0 != 0)
            {
                return Fail($"could not reach {Name(from)} from RUNNING: errno {e0}");
            }
            if (from == DeviceState.Resuming && to != (uint)DeviceState.Resuming)
            {
                if (_validStream is null)
                {
                    return Skip("no complete save stream to load before leaving RESUMING (see data.stop-copy-stream-ends)");
                }
                C.WriteMigrationData(_validStream);
            }
        }
        var path = ExpectedTransitions.Path(_flags, (uint)from, to);
        int e = SetState(to);
        int got = GetState();
        if (path is null)
        {
            if (e != Errno.EINVAL)
            {
                return Fail(e == 0 ? $"accepted (now {StateText(got)}); expected EINVAL" : $"errno {e}; expected EINVAL");
            }
            return got == (int)from ? Pass("EINVAL, state unchanged") : Fail($"EINVAL but the state moved to {StateText(got)}");
        }
        if (e != 0)
        {
            return Fail($"refused with errno {e} (now {StateText(got)}); expected path {Describe(path)}");
        }
        if (got != (int)to)
        {
            return Fail($"SET succeeded but GET says {StateText(got)}");
        }
        var t = (DeviceState)to;
        int re = ProbeRead(), we = ProbeWrite();
        bool readOk = re == 0, writeOk = we == 0;
        if (readOk != ExpectedTransitions.IsSaving(t))
        {
            return Fail($"MIG_DATA_READ in {Name(to)}: {(readOk ? "served" : $"errno {re}")}; expected {(ExpectedTransitions.IsSaving(t) ? "served (saving group)" : "refused")}");
        }
        if (writeOk != (t == DeviceState.Resuming))
        {
            return Fail($"MIG_DATA_WRITE in {Name(to)}: {(writeOk ? "served" : $"errno {we}")}; expected {(t == DeviceState.Resuming ? "served" : "refused")}");
        }
        string stream = path.Count == 0 ? "" :
            ExpectedTransitions.OpensStream(path[^1].From, path[^1].To) ? "; last arc opens a stream" :
            path.Any(a => ExpectedTransitions.ClosesStream(a.From, a.To)) ? "; closes the stream" : "";
        return Pass((path.Count == 0 ? "already there" : "path " + Describe(path)) + stream);
    }

    private static string Describe(IReadOnlyList<(DeviceState From, DeviceState To)> path) =>
        path.Count == 0 ? "(none)" : Name(path[0].From) + string.Concat(path.Select(a => "->" + Name(a.To)));

    // ---------------------------------------------------------------- data

    private void Data()
    {
        byte[]? full = null;
        int chunk = C.MaxMigrationChunk;
        Check("data.read-outside-saving", "data", SpecMigData + ": READ only in PRE_COPY/STOP_COPY", () =>
        {
            if (!ToRunning(out string why))
            {
                return Fail(why);
            }
            int e = Send(VfioUserCommand.MigDataRead, MigHead(8 + 64, 64), out _);
            return e == Errno.EINVAL ? Pass("EINVAL in RUNNING") : Fail(e == 0 ? "served in RUNNING" : $"errno {e}, expected EINVAL");
        });
        Check("data.write-outside-resuming", "data", SpecMigData + ": WRITE only in RESUMING", () =>
        {
            // argsz covers the data (libvfio-user refuses argsz < 8 + size), so only the state can make it fail.
            var p = new byte[MigDataHead.WireSize + 4];
            new MigDataHead(MigDataHead.WireSize + 4, 4).WriteTo(p);
            int e = Send(VfioUserCommand.MigDataWrite, p, out _);
            return e == Errno.EINVAL ? Pass("EINVAL in RUNNING") : Fail(e == 0 ? "accepted in RUNNING" : $"errno {e}, expected EINVAL");
        });
        Check("data.stop-copy-stream-ends", "data", SpecMigData + ": a short reply is the end of the stream in STOP_COPY", () =>
        {
            if (!ToRunning(out string why))
            {
                return Fail(why);
            }
            int e = SetState((uint)DeviceState.StopCopy);
            if (e != 0)
            {
                return Fail($"SET STOP_COPY: errno {e}");
            }
            full = ReadToShort(chunk, out why, out int reads);
            return full is null ? Fail(why) : Pass($"{full.Length} bytes in {reads} reads of {chunk}");
        });
        Check("data.end-is-permanent", "data", "vfio.h: read() returns 0 at the permanent end in STOP_COPY (reference §2.2)", () =>
        {
            if (full is null)
            {
                return Skip("no complete stream");
            }
            for (int i = 0; i < 3; i++)
            {
                int n = C.ReadMigrationData(4096, Stream.Null);
                if (n != 0)
                {
                    return Fail($"read {i + 1} after the end returned {n} bytes");
                }
            }
            return Pass("3 more reads returned 0 bytes");
        });
        Check("data.read-size-over-max", "data", SpecMigData + ": size ≤ max_data_xfer_size", () =>
        {
            uint size = C.ServerCapabilities.MaxDataXferSize + 1;
            int e = Send(VfioUserCommand.MigDataRead, MigHead(8 + size, size), out _);
            return e != 0 ? Pass($"refused with errno {e}") : Fail($"a read of {size} bytes was accepted");
        });
        Check("data.read-argsz-too-small", "data", SpecMigData + ": argsz ≥ 8 + size", () =>
        {
            int e = Send(VfioUserCommand.MigDataRead, MigHead(8, 64), out _);
            return e != 0 ? Pass($"refused with errno {e}") : Fail("argsz 8 with size 64 was accepted");
        });
        Check("data.any-read-size-same-bytes", "data", "vfio.h: the stream's segmentation is not preserved (reference §2.1)", () =>
        {
            if (full is null)
            {
                return Skip("no complete stream");
            }
            if (!ToRunning(out string why))
            {
                return Fail(why);
            }
            int e = SetState((uint)DeviceState.StopCopy);
            if (e != 0)
            {
                return Fail($"SET STOP_COPY: errno {e}");
            }
            int odd = Math.Max(4097, (full.Length / 64) | 1);
            var again = ReadToShort(odd, out why, out int reads);
            if (again is null)
            {
                return Fail(why);
            }
            return again.AsSpan().SequenceEqual(full)
                ? Pass($"{reads} reads of {odd} bytes gave the same {full.Length} bytes as reads of {chunk}")
                : Fail($"reads of {odd} bytes gave {again.Length} bytes that differ from the {full.Length} read in {chunk}-byte reads (idle device)");
        });
        Check("data.load-round-trip", "data", "vfio.h RESUMING→STOP loads the stream (reference §1.3 arc 8)", () =>
        {
            if (full is null)
            {
                return Skip("no complete stream");
            }
            if (!ToRunning(out string why))
            {
                return Fail(why);
            }
            int e = Load(full, out string step);
            if (e != 0)
            {
                return Fail($"{step}: errno {e}");
            }
            int s = GetState();
            return s == (int)DeviceState.Stop ? Pass($"{full.Length} bytes loaded; STOP") : Fail($"after the load GET says {StateText(s)}");
        });
        Check("data.truncated-load-refused", "data", "vfio.h: RESUMING→STOP must fail on incomplete data (reference §2.5)", () =>
        {
            if (full is null || full.Length < 2)
            {
                return Skip("stream too short to truncate");
            }
            if (!ToRunning(out string why))
            {
                return Fail(why);
            }
            int e = Load(full[..(full.Length / 2)], out string step);
            int s = GetState();
            if (e == 0)
            {
                return Fail($"half of the stream ({full.Length / 2} bytes) was accepted");
            }
            if (s < 0)
            {
                return Fail($"after the failed {step} GET failed: errno {-s}");
            }
            if (!ToRunning(out why))
            {
                return Fail("device not usable after the failed load: " + why);
            }
            return Pass($"{step} refused with errno {e}; state reported as {StateText(s)}; reset back to RUNNING");
        });
        if ((_flags & MigrationFlags.PreCopy) != 0)
        {
            Check("data.pre-copy-stream", "data", SpecMigData + ": in PRE_COPY a short reply means \"nothing more for now\"; saving-group arcs keep the stream", PreCopyStream);
        }
        else
        {
            Record("data.pre-copy-stream", "data", CheckOutcome.Skip, "device has no PRE_COPY", SpecMigData, 0);
        }
        Check("data.mig-data-size", "data", "vmig extension MIG_DATA_SIZE (feature 9, kernel layout)", () =>
        {
            if (!C.SupportsStopCopySize)
            {
                return Skip("extension not negotiated");
            }
            if (!ToRunning(out string why))
            {
                return Fail(why);
            }
            ulong est = C.GetStopCopySize();
            return Pass($"estimate {est} bytes" + (full is null ? "" : $" (actual stream {full.Length})"));
        });
    }

    private (CheckOutcome, string) PreCopyStream()
    {
        if (!ToRunning(out string why))
        {
            return Fail(why);
        }
        int e = SetState((uint)DeviceState.PreCopy);
        if (e != 0)
        {
            return Fail($"SET PRE_COPY: errno {e}");
        }
        var sb = new StringBuilder();
        if (C.SupportsPrecopyInfo)
        {
            var info = C.GetPrecopyInfo();
            if (info.InitialBytes == 0)
            {
                return Fail("pre-copy info: initial_bytes 0 at the start of PRE_COPY");
            }
            sb.Append($"initial_bytes {info.InitialBytes}; ");
        }
        int chunk = C.MaxMigrationChunk;
        var part1 = ReadToShort(chunk, out why, out _);
        if (part1 is null)
        {
            return Fail("PRE_COPY: " + why);
        }
        int extra = C.ReadMigrationData(4096, Stream.Null);
        if (extra == 4096)
        {
            return Fail("after a short reply in PRE_COPY the next read was full (idle device)");
        }
        if (extra > 0)
        {
            return Fail($"after a short reply in PRE_COPY an idle device produced {extra} more bytes");
        }
        int s = GetState();
        if (s != (int)DeviceState.PreCopy)
        {
            return Fail($"after \"nothing for now\" the state is {StateText(s)}, expected PRE_COPY");
        }
        if (C.SupportsPrecopyInfo)
        {
            var info = C.GetPrecopyInfo();
            if (info.InitialBytes != 0 || info.DirtyBytes != 0)
            {
                return Fail($"pre-copy info after draining: initial {info.InitialBytes}, dirty {info.DirtyBytes}; expected 0/0");
            }
        }
        sb.Append($"PRE_COPY gave {part1.Length} bytes then nothing for now");
        byte[] part2 = [];
        if ((_flags & MigrationFlags.P2P) != 0)
        {
            e = SetState((uint)DeviceState.PreCopyP2P);
            if (e != 0)
            {
                return Fail($"PRE_COPY->PRE_COPY_P2P: errno {e}");
            }
            part2 = ReadToShort(chunk, out why, out _) ?? [];
            sb.Append($"; PRE_COPY_P2P {part2.Length}");
        }
        e = SetState((uint)DeviceState.StopCopy);
        if (e != 0)
        {
            return Fail($"SET STOP_COPY from pre-copy: errno {e}");
        }
        var part3 = ReadToShort(chunk, out why, out _);
        if (part3 is null)
        {
            return Fail("STOP_COPY after PRE_COPY: " + why);
        }
        sb.Append($"; STOP_COPY {part3.Length}");
        byte[] whole = [.. part1, .. part2, .. part3];
        if (!ToRunning(out why))
        {
            return Fail(why);
        }
        e = Load(whole, out string step);
        if (e != 0)
        {
            return Fail($"the {whole.Length}-byte stream read across the saving group does not load back ({step}: errno {e}); the arcs inside the saving group must keep one stream");
        }
        return Pass(sb.Append("; the concatenation loads back as one stream").ToString());
    }

    // ---------------------------------------------------------------- reset

    private void Reset()
    {
        foreach (var s in ExpectedTransitions.States(_flags).Where(s => s != DeviceState.Running))
        {
            var state = s;
            Check($"reset.from-{Name(state)}", "reset", SpecReset, () =>
            {
                if (!_o.ExpectResetToRunning)
                {
                    return Skip("reset semantics of this server keep the state (ExpectResetToRunning=false)");
                }
                if (!ToRunning(out string why))
                {
                    return Fail(why);
                }
                int e = SetState((uint)state);
                if (e != 0)
                {
                    return Fail($"SET {Name(state)}: errno {e}");
                }
                if (ExpectedTransitions.IsSaving(state))
                {
                    _ = C.ReadMigrationData(4096, Stream.Null);
                }
                e = Send(VfioUserCommand.DeviceReset, [], out _);
                if (e != 0)
                {
                    return Fail($"DEVICE_RESET in {Name(state)}: errno {e}");
                }
                int got = GetState();
                if (got != (int)DeviceState.Running)
                {
                    return Fail($"after reset GET says {StateText(got)}, expected RUNNING");
                }
                int re = Send(VfioUserCommand.MigDataRead, MigHead(8 + 4096, 4096), out _);
                int we = ProbeWrite();
                return re != 0 && we != 0 ? Pass($"RUNNING; the old stream is gone (read errno {re}, write errno {we})") : Fail("a data command of the old stream still ran after reset");
            });
        }
    }

    // ---------------------------------------------------------------- gating

    private void Gating()
    {
        bool configReadable = false;
        try
        {
            configReadable = ToRunning(out _) && C.GetDeviceInfo().NumRegions > VfioPci.ConfigRegionIndex
                && (C.GetRegionInfo(VfioPci.ConfigRegionIndex) is var ri) && (ri.Flags & RegionFlags.Read) != 0 && ri.Size >= 4;
        }
        catch (VfioUserException)
        {
        }
        foreach (var s in ExpectedTransitions.States(_flags))
        {
            var state = s;
            bool stopped = state is DeviceState.Stop or DeviceState.StopCopy;
            Check($"gating.dma-map.{Name(state)}", "gating", SpecGating, () =>
            {
                if (!Enter(state, out string why))
                {
                    return Fail(why);
                }
                const ulong iova = 1UL << 40;
                var req = new byte[DmaMapRequest.WireSize];
                new DmaMapRequest(DmaMapRequest.WireSize, DmaMapRequest.FlagRead | DmaMapRequest.FlagWrite, 0, iova, 4096).WriteTo(req);
                int e = Send(VfioUserCommand.DmaMap, req, out _);
                if (e == 0)
                {
                    var un = new byte[DmaUnmapRequest.WireSize];
                    new DmaUnmapRequest(DmaUnmapRequest.WireSize, 0, iova, 4096).WriteTo(un);
                    _ = Send(VfioUserCommand.DmaUnmap, un, out _);
                }
                if (stopped)
                {
                    return e != 0 ? Pass($"refused in {Name(state)} with errno {e}") : Fail($"DMA_MAP ran in {Name(state)}");
                }
                return e == 0 ? Pass($"served in {Name(state)}") : Fail($"DMA_MAP refused in {Name(state)} with errno {e}");
            });
            Check($"gating.config-read.{Name(state)}", "gating", SpecGating, () =>
            {
                if (!configReadable)
                {
                    return Skip("no readable config region (index 7)");
                }
                if (!Enter(state, out string why))
                {
                    return Fail(why);
                }
                Span<byte> b = stackalloc byte[4];
                C.ReadRegion(VfioPci.ConfigRegionIndex, 0, b);
                return Pass($"config space answers in {Name(state)}");
            });
        }
        _ = ToRunning(out _);
    }

    private bool Enter(DeviceState state, out string why)
    {
        if (!ToRunning(out why))
        {
            return false;
        }
        int e = state == DeviceState.Running ? 0 : SetState((uint)state);
        why = e == 0 ? "" : $"SET {Name(state)}: errno {e}";
        return e == 0;
    }
}
