using System.Buffers.Binary;
using System.Numerics;
using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using Vmig.Migration;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Bench;

/// <summary>
/// `Vmig.Bench micro [BenchmarkDotNet args]`: BenchmarkDotNet micro-benchmarks of the hot paths, each class with a
/// baseline method in the same class (BenchmarkDotNet prints the Ratio column against it). In-process toolchain
/// (no per-benchmark project build); run from a Release build.
/// </summary>
internal static class Micro
{
    public static int Run(string[] args)
    {
        var job = (args.Contains("--quick") ? Job.ShortRun : Job.Default.WithWarmupCount(3).WithIterationCount(10))
            .WithToolchain(InProcessEmitToolchain.Instance);
        var config = DefaultConfig.Instance.AddJob(job).WithOptions(ConfigOptions.DisableOptimizationsValidator);
        var rest = args.Where(a => a != "--quick").ToArray();
        var summaries = BenchmarkSwitcher.FromTypes([typeof(CodecBench), typeof(NextStateBench), typeof(DirtyBench), typeof(Crc32CBench)])
            .Run(rest.Length == 0 ? ["--filter", "*"] : rest, config);
        return summaries.Any(s => s.HasCriticalValidationErrors) ? 1 : 0;
    }
}

/// <summary>vfio-user header and payload-head codecs vs writing/reading the same 16+16 bytes with BinaryPrimitives.</summary>
[MemoryDiagnoser]
public class CodecBench
{
    private readonly byte[] _buf = new byte[64];
    private ushort _id;

    [Benchmark(Baseline = true, Description = "raw 32 B BinaryPrimitives write+read")]
    public ulong Raw()
    {
        var s = _buf.AsSpan();
        BinaryPrimitives.WriteUInt16LittleEndian(s, ++_id);
        BinaryPrimitives.WriteUInt16LittleEndian(s[2..], 10);
        BinaryPrimitives.WriteUInt32LittleEndian(s[4..], 36);
        BinaryPrimitives.WriteUInt64LittleEndian(s[8..], 0);
        BinaryPrimitives.WriteUInt64LittleEndian(s[16..], 0x100);
        BinaryPrimitives.WriteUInt64LittleEndian(s[24..], 4UL << 32);
        return BinaryPrimitives.ReadUInt32LittleEndian(s[4..]) + BinaryPrimitives.ReadUInt64LittleEndian(s[16..]) + BinaryPrimitives.ReadUInt32LittleEndian(s[28..]);
    }

    [Benchmark(Description = "VfioUserHeader + RegionAccessHead write+read")]
    public ulong Header()
    {
        var s = _buf.AsSpan();
        new VfioUserHeader(++_id, VfioUserCommand.RegionWrite, 36, VfioUserHeaderFlags.Command).WriteTo(s);
        new RegionAccessHead(0x100, 0, 4).WriteTo(s[16..]);
        var h = VfioUserHeader.ReadFrom(s);
        RegionAccessHead.TryRead(s[16..], out var r);
        return h.MessageSize + r.Offset + r.Count;
    }

    [Benchmark(Description = "MigDataHead write+read")]
    public ulong MigData()
    {
        var s = _buf.AsSpan();
        new MigDataHead(8 + (1 << 20), 1 << 20).WriteTo(s);
        MigDataHead.TryRead(s, out var m);
        return m.Size;
    }
}

/// <summary>Next-step lookup over all 64 (current, target) pairs for the full flag set, vs a bare 64-entry table read.</summary>
public class NextStateBench
{
    private static readonly byte[] Table = Enumerable.Range(0, 64).Select(i => (byte)(i % 8)).ToArray();
    private const MigrationFlags All = MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;

    [Benchmark(Baseline = true, Description = "64 plain table reads")]
    public int Table64()
    {
        int sum = 0;
        for (int i = 0; i < 64; i++)
        {
            sum += Table[i];
        }
        return sum;
    }

    [Benchmark(Description = "64 × MigrationStateMachine.TryGetNextState")]
    public int TryGetNextState()
    {
        int sum = 0;
        for (int c = 0; c < 8; c++)
        {
            for (int t = 0; t < 8; t++)
            {
                sum += MigrationStateMachine.TryGetNextState(All, (DeviceState)c, (DeviceState)t, out var n) + (int)n;
            }
        }
        return sum;
    }
}

/// <summary>
/// Dirty tracking over 1 GiB at 4 KiB pages (262,144 pages) with 1% of pages dirty: DmaSpace.Report (read and
/// clear into a u64 bitmap), DirtyBitmap scan (Count, EnumerateDirtyPages) and wire encoding (WriteTo), vs a plain
/// popcount pass over the same 32 KiB of words.
/// </summary>
public class DirtyBench : IDisposable
{
    private const ulong Size = 1UL << 30;
    private const ulong Page = 4096;
    private readonly DmaSpace _dma = new();
    private readonly ulong[] _report = new ulong[Size / Page / 64];
    private readonly DirtyBitmap _bitmap = new(0, Size, Page);
    private readonly byte[] _wire;
    private readonly ulong[] _dirtyPages;

    public DirtyBench()
    {
        _dma.Map(0, Size, DmaProt.Read | DmaProt.Write, null);
        _dma.StartLogging(Page);
        var rng = new Random(5);
        _dirtyPages = Enumerable.Range(0, (int)(Size / Page / 100)).Select(_ => (ulong)rng.NextInt64((long)(Size / Page))).ToArray();
        foreach (ulong p in _dirtyPages)
        {
            _bitmap.SetPage(p);
        }
        _wire = new byte[_bitmap.ByteLength];
    }

    [Benchmark(Baseline = true, Description = "popcount over 32 KiB of u64 words")]
    public int PopCount()
    {
        int n = 0;
        foreach (ulong w in _bitmap.Words)
        {
            n += BitOperations.PopCount(w);
        }
        return n;
    }

    [Benchmark(Description = "DmaSpace.MarkDirty ×2621 + Report 1 GiB")]
    public int Report()
    {
        foreach (ulong p in _dirtyPages)
        {
            _dma.MarkDirty(p * Page, 8);
        }
        return _dma.Report(0, Size, Page, _report);
    }

    [Benchmark(Description = "DirtyBitmap.Count")]
    public ulong Count() => _bitmap.Count();

    [Benchmark(Description = "DirtyBitmap.EnumerateDirtyPages")]
    public ulong Enumerate()
    {
        ulong s = 0;
        foreach (ulong p in _bitmap.EnumerateDirtyPages())
        {
            s += p;
        }
        return s;
    }

    [Benchmark(Description = "DirtyBitmap.WriteTo (wire encoding)")]
    public int Encode()
    {
        _bitmap.WriteTo(_wire);
        return _wire[0];
    }

    public void Dispose()
    {
        _dma.Dispose();
        GC.SuppressFinalize(this);
    }
}

/// <summary>
/// CRC32C of a 4 KiB page and of a 1 MiB record payload: the single-chain u64 loop (the implementation before the
/// three-lane one, kept here as "before"), Vmig.Spec.Crc32C (three lanes on SSE4.2 + PCLMULQDQ), vs copying the same
/// bytes (memcpy speed, the baseline).
/// </summary>
public class Crc32CBench
{
    private byte[] _src = [];
    private byte[] _dst = [];

    [Params(4096, 1 << 20)]
    public int Size { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _src = new byte[Size];
        _dst = new byte[Size];
        new Random(9).NextBytes(_src);
    }

    [Benchmark(Baseline = true, Description = "copy")]
    public byte Copy()
    {
        _src.AsSpan().CopyTo(_dst);
        return _dst[^1];
    }

    [Benchmark(Description = "CRC32C single chain (before)")]
    public uint Serial()
    {
        uint crc = ~0u;
        foreach (ulong w in MemoryMarshal.Cast<byte, ulong>(_src))
        {
            crc = BitOperations.Crc32C(crc, w);
        }
        return ~crc;
    }

    [Benchmark(Description = "Vmig.Spec.Crc32C.Compute (3 lanes)")]
    public uint Interleaved() => Vmig.Spec.Crc32C.Compute(_src);

    [Benchmark(Description = "Crc32C.AppendCopy (copy and CRC in one pass)")]
    public uint AppendCopy() => Vmig.Spec.Crc32C.AppendCopy(Vmig.Spec.Crc32C.Start, _src, _dst);

    [Benchmark(Description = "copy, then Crc32C of the copy")]
    public uint CopyThenCrc()
    {
        _src.AsSpan().CopyTo(_dst);
        return Vmig.Spec.Crc32C.Compute(_dst);
    }
}
