using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text.Json;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.Conformance;

/// <summary>Settings of <see cref="ProtocolFuzzer.Run"/>.</summary>
public sealed record FuzzOptions
{
    /// <summary>Seed of the case generator: the same seed sends the same cases in the same order.</summary>
    public int Seed { get; init; } = 1;

    /// <summary>Stop after this long.</summary>
    public TimeSpan Duration { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>Stop after this many cases (whichever comes first).</summary>
    public long MaxCases { get; init; } = long.MaxValue;

    /// <summary>Per-message timeout in milliseconds: a request in frame that gets no reply in this time, or a server
    /// that cannot be reached again within 3× this, is a hang.</summary>
    public int MessageTimeoutMs { get; init; } = 2000;

    /// <summary>The server's process id (for crash detection and RSS); null when unknown (in-process servers).</summary>
    public int? ServerPid { get; init; }

    /// <summary>The server's VmRSS may grow by at most this many bytes over the run.</summary>
    public long MaxRssGrowthBytes { get; init; } = 256L << 20;

    /// <summary>Gets a line per finding (and per 1000 cases) as the run goes.</summary>
    public Action<string>? Log { get; init; }
}

/// <summary>
/// What a fuzz run did and found. <see cref="Success"/> means no crash, no hang and memory within bound.
/// A finding names the seed and case number; rerunning with that seed and <c>MaxCases = case + 1</c> replays it.
/// <see cref="SequenceDigest"/> hashes every generated message: equal seeds and case counts give equal digests.
/// </summary>
public sealed record FuzzReport(
    int Seed,
    long Cases,
    long MessagesSent,
    long Replies,
    long ErrorReplies,
    long ConnectionsClosedByServer,
    IReadOnlyDictionary<int, long> Errnos,
    int Crashes,
    int Hangs,
    long StartRssBytes,
    long MaxRssBytes,
    TimeSpan Elapsed,
    IReadOnlyList<string> Findings,
    ulong SequenceDigest)
{
    /// <summary>Distinct errno values seen in error replies.</summary>
    public int DistinctErrnos => Errnos.Count;

    /// <summary>VmRSS growth over the run in bytes (0 when the pid is unknown).</summary>
    public long RssGrowthBytes => Math.Max(0, MaxRssBytes - StartRssBytes);

    /// <summary>True when the run found no crash, no hang and no memory overrun.</summary>
    public bool Success => Crashes == 0 && Hangs == 0 && Findings.Count == 0;

    /// <summary>One line for a console.</summary>
    public string Summary() => string.Create(CultureInfo.InvariantCulture,
        $"seed {Seed}: {Cases} cases, {MessagesSent} messages, {Replies} replies ({ErrorReplies} errors, {DistinctErrnos} distinct errnos: {string.Join(",", Errnos.Keys.Order())}), " +
        $"{ConnectionsClosedByServer} closes by the server, {Crashes} crashes, {Hangs} hangs, RSS {StartRssBytes >> 20}→{MaxRssBytes >> 20} MiB, {Elapsed.TotalSeconds:F1} s");

    /// <summary>The report as indented JSON.</summary>
    public string ToJson() => JsonSerializer.Serialize(this, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase });
}

/// <summary>
/// A seeded, reproducible mutation fuzzer for vfio-user servers. Each case connects (usually negotiating VERSION),
/// sends 1-8 real messages drawn from a corpus (every command, valid payloads, fds where they belong, state changes
/// so commands land in the wrong migration state), mutating some: bit flips, lying msg_size (larger ones padded so
/// the stream stays in frame; below 16 expects a close), truncation, lying counts and sizes, wrong fd counts,
/// swapped commands and header flags, VERSION out of order or missing. After each case the server must answer a
/// valid request (on the same connection when it is in frame, else on a new one). No crash, no hang, bounded RSS.
/// </summary>
public static class ProtocolFuzzer
{
    /// <summary>Fuzzes the server at <paramref name="socketPath"/> for <see cref="FuzzOptions.Duration"/>.</summary>
    public static FuzzReport Run(string socketPath, FuzzOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(socketPath);
        using var f = new FuzzRun(socketPath, options ?? new FuzzOptions());
        return f.Execute();
    }
}

internal sealed class FuzzRun : IDisposable
{
    private const int MaxPad = 4 << 20;
    private readonly string _path;
    private readonly FuzzOptions _o;
    private readonly Random _rng;
    private readonly Dictionary<int, long> _errnos = [];
    private readonly List<string> _findings = [];
    private readonly UnixFd _memfd;
    private readonly EventFd _eventfd;
    private RawPeer? _peer;
    private long _cases, _sent, _replies, _errors, _closes;
    private int _crashes, _hangs;
    private long _rss0, _rssMax;

    public FuzzRun(string path, FuzzOptions o)
    {
        _path = path;
        _o = o;
        _rng = new Random(o.Seed);
        _memfd = MemFd.Create("vmig-fuzz", 64 * 1024);
        _eventfd = EventFd.Create();
    }

    public void Dispose()
    {
        _peer?.Dispose();
        _memfd.Dispose();
        _eventfd.Dispose();
    }

    public FuzzReport Execute()
    {
        var sw = Stopwatch.StartNew();
        _rss0 = _rssMax = ReadRss();
        while (sw.Elapsed < _o.Duration && _cases < _o.MaxCases)
        {
            if (!RunCase(_cases))
            {
                break;
            }
            _cases++;
            if (_cases % 64 == 0)
            {
                _rssMax = Math.Max(_rssMax, ReadRss());
                if (_o.ServerPid is not null && _rssMax - _rss0 > _o.MaxRssGrowthBytes)
                {
                    Finding($"case {_cases}: server RSS grew from {_rss0 >> 20} MiB to {_rssMax >> 20} MiB (bound {_o.MaxRssGrowthBytes >> 20} MiB)");
                    break;
                }
            }
            if (_cases % 1000 == 0)
            {
                _o.Log?.Invoke($"{_cases} cases, {_sent} messages, {_errnos.Count} distinct errnos");
            }
        }
        _rssMax = Math.Max(_rssMax, ReadRss());
        return new FuzzReport(_o.Seed, _cases, _sent, _replies, _errors, _closes, new SortedDictionary<int, long>(_errnos), _crashes, _hangs, _rss0, _rssMax, sw.Elapsed, _findings, _digest);
    }

    private void Finding(string s)
    {
        _findings.Add($"seed {_o.Seed} {s}");
        _o.Log?.Invoke("FINDING " + _findings[^1]);
    }

    private long ReadRss()
    {
        if (_o.ServerPid is not int pid)
        {
            return 0;
        }
        try
        {
            foreach (var line in File.ReadLines($"/proc/{pid}/status"))
            {
                if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
                {
                    var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                    return long.Parse(parts[1], CultureInfo.InvariantCulture) * 1024;
                }
            }
        }
        catch (IOException)
        {
        }
        return 0;
    }

    private bool ServerAlive()
    {
        if (_o.ServerPid is not int pid)
        {
            return true;
        }
        try
        {
            foreach (var line in File.ReadLines($"/proc/{pid}/status"))
            {
                if (line.StartsWith("State:", StringComparison.Ordinal))
                {
                    return !line.Contains('Z', StringComparison.Ordinal) && !line.Contains('X', StringComparison.Ordinal);
                }
            }
        }
        catch (IOException)
        {
        }
        return false;
    }

    /// <summary>One case. False when the server is gone or hung (the run stops).</summary>
    private bool RunCase(long index)
    {
        // Every random choice of the case is made up front, so the generated sequence depends only on the seed,
        // never on how the server answered (timeouts, closes): same seed, same messages.
        bool negotiate = _rng.Next(10) != 0;
        bool fresh = _rng.Next(4) == 0;
        int n = 1 + _rng.Next(8);
        var plan = new List<Planned>(n);
        for (int i = 0; i < n; i++)
        {
            plan.Add(Plan());
        }
        bool inFrame = true;
        bool negotiated = true;
        if (_peer is null || fresh)
        {
            _peer?.Dispose();
            _peer = Reconnect(negotiate, out negotiated);
            if (_peer is null)
            {
                return Dead(index, "could not connect");
            }
        }
        for (int i = 0; i < plan.Count && inFrame && _peer is not null; i++)
        {
            inFrame = SendPlanned(plan[i], index, ref negotiated);
        }
        // Liveness: a valid request must be answered, in frame on this connection, or on a new one.
        if (inFrame && _peer is not null && negotiated)
        {
            try
            {
                var r = _peer.Request(VfioUserCommand.DeviceGetInfo, Info(), _o.MessageTimeoutMs);
                if (r is not null)
                {
                    Count(r);
                    return true;
                }
                _closes++;
            }
            catch (TimeoutException)
            {
                // In frame and no answer: either a hang, or our own mutation left the server waiting; decide on a new connection.
            }
            catch (NativeException)
            {
                _closes++;
            }
            catch (InvalidDataException e)
            {
                Finding($"case {index}: server sent a malformed message: {e.Message}");
            }
        }
        _peer?.Dispose();
        _peer = Reconnect(true, out negotiated);
        if (_peer is null)
        {
            return Dead(index, "no valid request answered after the case (reconnect failed)");
        }
        try
        {
            // Any answer proves the server alive: GET_INFO is refused (EINVAL) while the device is stopped.
            var r = _peer.Request(VfioUserCommand.DeviceGetInfo, Info(), _o.MessageTimeoutMs);
            if (r is not null)
            {
                Count(r);
                return true;
            }
            return Dead(index, "a new connection was closed on a valid request");
        }
        catch (Exception e) when (e is TimeoutException or NativeException or InvalidDataException)
        {
            return Dead(index, "a new connection did not answer GET_INFO: " + e.Message);
        }
    }

    private bool Dead(long index, string why)
    {
        if (!ServerAlive())
        {
            _crashes++;
            Finding($"case {index}: server process exited ({why})");
        }
        else
        {
            _hangs++;
            Finding($"case {index}: hang: {why}");
        }
        return false;
    }

    private RawPeer? Reconnect(bool negotiate, out bool negotiated)
    {
        negotiated = false;
        var deadline = Environment.TickCount64 + (3L * _o.MessageTimeoutMs);
        while (Environment.TickCount64 < deadline)
        {
            if (!ServerAlive())
            {
                return null;
            }
            RawPeer? p = null;
            try
            {
                p = RawPeer.Connect(_path);
                if (!negotiate)
                {
                    // The server may still be closing our previous connection and refuse this one; a refused
                    // connection shows up as a close on the first real message, which the case handles.
                    return p;
                }
                var r = p.Negotiate(_o.MessageTimeoutMs);
                _sent++;
                if (r is { IsSuccess: true })
                {
                    negotiated = true;
                    return p;
                }
            }
            catch (Exception e) when (e is SocketException or NativeException or IOException or TimeoutException or InvalidDataException)
            {
            }
            p?.Dispose();
            Thread.Sleep(10);
        }
        return null;
    }

    private void Count(RawMessage r)
    {
        _replies++;
        if (r.Header.IsError)
        {
            _errors++;
            _errnos[r.Errno] = _errnos.GetValueOrDefault(r.Errno) + 1;
        }
    }

    private static byte[] Info()
    {
        var b = new byte[DeviceInfoPayload.WireSize];
        new DeviceInfoPayload(DeviceInfoPayload.WireSize, 0, 0, 0).WriteTo(b);
        return b;
    }

    /// <summary>One generated message: the real template and the mutation applied to it.</summary>
    private sealed record Planned(VfioUserCommand Command, byte[] Payload, int[] Fds, VfioUserHeaderFlags Flags, uint? Size, int Pad,
        bool ExpectReply, bool InFrame, bool ExpectClose);

    /// <summary>Draws a real message from the corpus and maybe mutates it; folds it into <see cref="_digest"/>.</summary>
    private Planned Plan()
    {
        var (cmd, payload, fds) = Template();
        var flags = VfioUserHeaderFlags.Command;
        uint? size = null;
        int pad = 0;
        bool expectReply = true, inFrame = true, expectClose = false;
        if (_rng.Next(3) == 0)
        {
            switch (_rng.Next(9))
            {
                case 0:
                    FlipBits(payload);
                    break;
                case 1:
                    payload = payload[.._rng.Next(payload.Length + 1)];
                    break;
                case 2:
                    LieField(payload);
                    break;
                case 3:
                    fds = _rng.Next(3) switch
                    {
                        0 => [],
                        1 => [_eventfd.Handle.Fd],
                        _ => [_memfd.Fd, _eventfd.Handle.Fd, _eventfd.Handle.Fd],
                    };
                    break;
                case 4:
                    cmd = (VfioUserCommand)(_rng.Next(4) == 0 ? _rng.Next(65536) : _rng.Next(21));
                    break;
                case 5:
                    flags = (VfioUserHeaderFlags)_rng.Next(64);
                    expectReply = (flags & VfioUserHeaderFlags.TypeMask) == VfioUserHeaderFlags.Command && (flags & VfioUserHeaderFlags.NoReply) == 0;
                    break;
                case 6:
                    // Lying msg_size, larger: the server waits for (or drains) the rest, which we pad so the stream stays in frame.
                    uint real = (uint)(VfioUserHeader.Size + payload.Length);
                    uint lie = _rng.Next(3) switch
                    {
                        0 => real + (uint)_rng.Next(1, 64),
                        1 => real + (uint)_rng.Next(1, MaxPad),
                        _ => 16u + VfioUserCapabilities.DefaultMaxDataXferSize + 4096u + (uint)_rng.Next(1, 65536),
                    };
                    size = lie;
                    pad = (int)(lie - real);
                    break;
                case 7:
                    // Lying msg_size, smaller than the header: framing is lost; the server must close, not crash.
                    size = (uint)_rng.Next(16);
                    expectClose = true;
                    break;
                default:
                    // Lying msg_size, smaller than the bytes sent: the tail is read as the next header (out of frame).
                    if (payload.Length > 0)
                    {
                        size = (uint)(VfioUserHeader.Size + _rng.Next(payload.Length));
                        inFrame = false;
                    }
                    break;
            }
        }
        Fold((ulong)cmd | ((ulong)flags << 16) | ((ulong)(size ?? 0) << 24));
        Fold((uint)pad | ((ulong)(uint)fds.Length << 32));
        foreach (byte b in payload)
        {
            Fold(b);
        }
        return new Planned(cmd, payload, fds, flags, size, pad, expectReply, inFrame, expectClose);
    }

    // FNV-1a over the generated messages: equal digests = the same sequence was generated.
    private ulong _digest = 14695981039346656037UL;

    private void Fold(ulong v)
    {
        for (int i = 0; i < 8; i++)
        {
            _digest = (_digest ^ (byte)(v >> (8 * i))) * 1099511628211UL;
        }
    }

    /// <summary>Sends one planned message and reads its reply when one is due. Returns false when the stream is no
    /// longer in frame (or closed).</summary>
    private bool SendPlanned(Planned m, long index, ref bool negotiated)
    {
        var p = _peer!;
        ushort id = p.NextId();
        try
        {
            p.Send(id, m.Command, m.Payload, m.Size, m.Flags, m.Fds);
            _sent++;
            if (m.Pad > 0)
            {
                SendPad(p, m.Pad);
            }
        }
        catch (NativeException)
        {
            // The server closed the connection (e.g. after an earlier message in this case): not a finding by itself.
            _closes++;
            p.Dispose();
            _peer = null;
            return false;
        }
        if (!m.InFrame)
        {
            return false;
        }
        if (!m.ExpectReply && !m.ExpectClose)
        {
            return true;
        }
        try
        {
            var r = m.ExpectClose ? p.Receive(_o.MessageTimeoutMs) : p.WaitFor(id, _o.MessageTimeoutMs);
            if (r is null)
            {
                _closes++;
                p.Dispose();
                _peer = null;
                return false;
            }
            Count(r);
            if (m.Command == VfioUserCommand.Version && r.IsSuccess)
            {
                negotiated = true;
            }
            return !m.ExpectClose;
        }
        catch (TimeoutException)
        {
            // A mutated header (a command the server answers with nothing, a size it still waits on) may legitimately
            // get no reply; the liveness check after the case decides whether the server is alive.
            return false;
        }
        catch (InvalidDataException e)
        {
            Finding($"case {index}: server sent a malformed message: {e.Message}");
            return false;
        }
    }

    private static void SendPad(RawPeer p, int bytes)
    {
        var zero = new byte[Math.Min(bytes, 1 << 20)];
        while (bytes > 0)
        {
            int n = Math.Min(bytes, zero.Length);
            p.SendBytes(zero.AsSpan(0, n));
            bytes -= n;
        }
    }

    private void FlipBits(byte[] b)
    {
        if (b.Length == 0)
        {
            return;
        }
        int flips = 1 + _rng.Next(4);
        for (int i = 0; i < flips; i++)
        {
            int bit = _rng.Next(b.Length * 8);
            b[bit / 8] ^= (byte)(1 << (bit % 8));
        }
    }

    private static readonly ulong[] Interesting = [0, 1, 7, 8, 16, 4095, 4096, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, (1UL << 20) + 1, ulong.MaxValue, ulong.MaxValue - 7];

    private void LieField(byte[] b)
    {
        if (b.Length < 4)
        {
            return;
        }
        ulong v = Interesting[_rng.Next(Interesting.Length)];
        if (b.Length >= 8 && _rng.Next(2) == 0)
        {
            int at = _rng.Next((b.Length - 8) / 8 + 1) * 8;
            BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(at), v);
        }
        else
        {
            int at = _rng.Next((b.Length - 4) / 4 + 1) * 4;
            BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(at), (uint)v);
        }
    }

    /// <summary>A real, valid message drawn from the corpus (command, payload, fds).</summary>
    private (VfioUserCommand, byte[], int[]) Template()
    {
        switch (_rng.Next(22))
        {
            case 0:
                return (VfioUserCommand.DeviceGetInfo, Info(), []);
            case 1:
            {
                var b = new byte[RegionInfoPayload.WireSize];
                new RegionInfoPayload(256, 0, (uint)_rng.Next(10), 0, 0, 0).WriteTo(b);
                return (VfioUserCommand.DeviceGetRegionInfo, b, []);
            }
            case 2:
            {
                var b = new byte[IrqInfoPayload.WireSize];
                new IrqInfoPayload(IrqInfoPayload.WireSize, 0, (uint)_rng.Next(6), 0).WriteTo(b);
                return (VfioUserCommand.DeviceGetIrqInfo, b, []);
            }
            case 3:
            {
                var b = new byte[RegionIoFdsPayload.WireSize];
                new RegionIoFdsPayload(256, 0, (uint)_rng.Next(10), 0).WriteTo(b);
                return (VfioUserCommand.DeviceGetRegionIoFds, b, []);
            }
            case 4:
            {
                var b = new byte[RegionAccessHead.WireSize];
                new RegionAccessHead((ulong)_rng.Next(0, 0x10000), (uint)(_rng.Next(2) == 0 ? 0 : VfioPci.ConfigRegionIndex), (uint)_rng.Next(1, 256)).WriteTo(b);
                return (VfioUserCommand.RegionRead, b, []);
            }
            case 5:
            {
                int n = _rng.Next(1, 64);
                var b = new byte[RegionAccessHead.WireSize + n];
                // Offsets at or near the doorbell make the device run DMA commands, including through message windows.
                new RegionAccessHead((ulong)(_rng.Next(3) == 0 ? _rng.Next(0, 0x28) & ~7 : _rng.Next(0, 0x10000 - n)), 0, (uint)n).WriteTo(b);
                _rng.NextBytes(b.AsSpan(RegionAccessHead.WireSize));
                return (VfioUserCommand.RegionWrite, b, []);
            }
            case 6:
            {
                int n = _rng.Next(1, 4);
                var b = new byte[8 + (n * WriteMultiEntry.WireSize)];
                BinaryPrimitives.WriteUInt64LittleEndian(b, (ulong)n);
                for (int i = 0; i < n; i++)
                {
                    new WriteMultiEntry((ulong)_rng.Next(0x1000, 0x10000) & ~7UL, 0, 8, (ulong)_rng.NextInt64()).WriteTo(b.AsSpan(8 + (i * WriteMultiEntry.WireSize)));
                }
                return (VfioUserCommand.RegionWriteMulti, b, []);
            }
            case 7:
            {
                var b = new byte[DmaMapRequest.WireSize];
                new DmaMapRequest(DmaMapRequest.WireSize, 3, 0, 0x8000_0000UL + ((ulong)_rng.Next(4) << 16), 0x10000).WriteTo(b);
                return (VfioUserCommand.DmaMap, b, []);
            }
            case 8:
            {
                var b = new byte[DmaMapRequest.WireSize];
                new DmaMapRequest(DmaMapRequest.WireSize, 3, 0, 0x9000_0000UL + ((ulong)_rng.Next(4) << 16), 0x10000).WriteTo(b);
                return (VfioUserCommand.DmaMap, b, [_memfd.Fd]);
            }
            case 9:
            {
                var b = new byte[DmaUnmapRequest.WireSize];
                ulong baseIova = _rng.Next(2) == 0 ? 0x8000_0000UL : 0x9000_0000UL;
                new DmaUnmapRequest(DmaUnmapRequest.WireSize, 0, baseIova + ((ulong)_rng.Next(4) << 16), 0x10000).WriteTo(b);
                return (VfioUserCommand.DmaUnmap, b, []);
            }
            case 10:
            {
                var b = new byte[IrqSetPayload.WireSize];
                new IrqSetPayload(IrqSetPayload.WireSize, IrqSetFlags.DataEventfd | IrqSetFlags.ActionTrigger, 2, (uint)_rng.Next(4), 1).WriteTo(b);
                return (VfioUserCommand.DeviceSetIrqs, b, [_eventfd.Handle.Fd]);
            }
            case 11:
            {
                var b = new byte[IrqSetPayload.WireSize + 1];
                new IrqSetPayload((uint)b.Length, IrqSetFlags.DataBool | (_rng.Next(2) == 0 ? IrqSetFlags.ActionMask : IrqSetFlags.ActionUnmask), 0, 0, 1).WriteTo(b);
                b[^1] = 1;
                return (VfioUserCommand.DeviceSetIrqs, b, []);
            }
            case 12:
                return (VfioUserCommand.DeviceReset, [], []);
            case 13:
                return (VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, DeviceFeatureHead.Get | 1), []);
            case 14:
            case 15:
            {
                // State changes put later commands in every migration state (gating, data in the wrong state).
                var d = new byte[8];
                BinaryPrimitives.WriteUInt32LittleEndian(d, (uint)_rng.Next(1, 9));
                BinaryPrimitives.WriteInt32LittleEndian(d.AsSpan(4), -1);
                return (VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(16, DeviceFeatureHead.Set | 2, d), []);
            }
            case 16:
                return (VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(8, DeviceFeatureHead.Probe | (uint)_rng.Next(0x70000) | (uint)_rng.Next(12)), []);
            case 17:
            {
                var d = new byte[32];
                BinaryPrimitives.WriteUInt64LittleEndian(d, 4096);
                BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(8), 1);
                BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(16), 0x9000_0000);
                BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(24), 0x40000);
                return (VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(40, DeviceFeatureHead.Set | 6, d), []);
            }
            case 18:
            {
                var d = new byte[24];
                BinaryPrimitives.WriteUInt64LittleEndian(d, 0x9000_0000);
                BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(8), 0x40000);
                BinaryPrimitives.WriteUInt64LittleEndian(d.AsSpan(16), 4096);
                return (VfioUserCommand.DeviceFeature, RawPeer.FeaturePayload(8 + 24 + 8, DeviceFeatureHead.Get | 8, d), []);
            }
            case 19:
            {
                uint size = (uint)_rng.Next(0, 70000);
                var b = new byte[MigDataHead.WireSize];
                new MigDataHead(8 + size, size).WriteTo(b);
                return (VfioUserCommand.MigDataRead, b, []);
            }
            case 20:
            {
                int n = _rng.Next(0, 5000);
                var b = new byte[MigDataHead.WireSize + n];
                // argsz = 8 + size as a real client sends it, so the bytes reach the device's load; header
                // mutations elsewhere cover lying heads.
                new MigDataHead((uint)(MigDataHead.WireSize + n), (uint)n).WriteTo(b);
                _rng.NextBytes(b.AsSpan(MigDataHead.WireSize));
                return (VfioUserCommand.MigDataWrite, b, []);
            }
            default:
                return (VfioUserCommand.Version, RawPeer.VersionPayload(0, (ushort)_rng.Next(4), """{"capabilities":{"max_msg_fds":8}}"""), []);
        }
    }
}
