using System.Buffers.Binary;
using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Vmig.Spec;

/// <summary>
/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init 0xFFFFFFFF, final XOR 0xFFFFFFFF — the iSCSI / RFC 3720
/// variant; "123456789" → 0xE3069283) with the CPU's crc32 instruction. The one implementation every stream format,
/// device state and guest verifier uses.
/// </summary>
/// <remarks>
/// On x86-64 with SSE4.2 and PCLMULQDQ, inputs of at least <see cref="MinInterleaved"/> bytes run as three independent
/// crc32 chains over three equal lanes (the instruction has a 3-cycle latency but issues once a cycle, so one chain
/// uses a third of it), and the lane values are joined with a carry-less multiply by x^(8n−33) mod P and one crc32
/// reduction — the method of Intel's "Fast CRC Computation for iSCSI Polynomial Using CRC32 Instruction" (2011) and of
/// Linux's crc32c-intel. Elsewhere one chain of <see cref="BitOperations.Crc32C(uint, ulong)"/> (hardware where the CPU
/// has it, a table otherwise). Both give bit-identical results.
/// </remarks>
public static class Crc32C
{
    /// <summary>The running value to start with.</summary>
    public const uint Start = 0xFFFFFFFF;

    /// <summary>Smallest input (bytes) that takes the three-lane path (16 words a lane): below it the join costs more than the lanes save.</summary>
    internal const int MinInterleaved = 3 * 16 * 8;

    /// <summary>Longest lane in u64 words (8 KiB): long enough that the join is ~1% of a block, short enough to stay in L1 as three streams.</summary>
    private const int MaxLaneWords = 1024;

    /// <summary>
    /// <c>Shift[w]</c> = x^(64·w − 33) mod P (reflected, 32 bits) for w = 1..2·<see cref="MaxLaneWords"/>: multiplying a
    /// lane's value by it (carry-less) and reducing with crc32 of a zero running value (which multiplies by x^33 —
    /// x^32 from the instruction, x^1 from the product's reflected alignment) moves the value past w words of zeros.
    /// </summary>
    private static readonly uint[] Shift = BuildShift();

    /// <summary>True when the three-lane path is used on this CPU.</summary>
    public static bool IsInterleaved => Sse42.X64.IsSupported && Pclmulqdq.IsSupported && BitConverter.IsLittleEndian;

    /// <summary>CRC-32C of <paramref name="data"/>.</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => Finish(Append(Start, data));

    /// <summary>Feeds <paramref name="data"/> into a running (non-inverted) value; start with <see cref="Start"/>, end with <see cref="Finish"/>.</summary>
    public static uint Append(uint crc, ReadOnlySpan<byte> data) =>
        data.Length >= MinInterleaved && IsInterleaved ? Interleaved<CrcOnly>(crc, data, default) : AppendSerial(crc, data);

    /// <summary>
    /// Copies <paramref name="source"/> into the start of <paramref name="destination"/> and feeds the same bytes into
    /// a running value, in one pass over the source (each word is loaded once, then stored and fed into the CRC) —
    /// for stream producers that move payload into an outgoing buffer and must checksum it. The spans must not overlap.
    /// </summary>
    /// <returns>The running value after <paramref name="source"/>, equal to <c>Append(crc, source)</c>.</returns>
    /// <exception cref="ArgumentException"><paramref name="destination"/> is shorter than <paramref name="source"/>.</exception>
    public static uint AppendCopy(uint crc, ReadOnlySpan<byte> source, Span<byte> destination)
    {
        if (destination.Length < source.Length)
        {
            throw new ArgumentException($"destination ({destination.Length} bytes) is shorter than source ({source.Length} bytes)", nameof(destination));
        }
        if (source.Length >= MinInterleaved && IsInterleaved)
        {
            return Interleaved<WithCopy>(crc, source, destination);
        }
        source.CopyTo(destination);
        return AppendSerial(crc, source);
    }

    /// <summary>Final XOR of a running value.</summary>
    public static uint Finish(uint crc) => ~crc;

    /// <summary>One crc32 chain: whole u64 words through a cast (no per-word slicing), then the tail bytes.</summary>
    private static uint AppendSerial(uint crc, ReadOnlySpan<byte> data)
    {
        // The CRC consumes a word least significant byte first, i.e. in memory order on a little-endian machine.
        var words = MemoryMarshal.Cast<byte, ulong>(data);
        foreach (ulong w in words)
        {
            crc = BitOperations.Crc32C(crc, BitConverter.IsLittleEndian ? w : BinaryPrimitives.ReverseEndianness(w));
        }
        foreach (byte b in data[(words.Length * 8)..])
        {
            crc = BitOperations.Crc32C(crc, b);
        }
        return crc;
    }

    /// <summary>Blocks of three lanes (each ≤ <see cref="MaxLaneWords"/>, ≥ 16 words), then the &lt; 48-word tail in one chain.</summary>
    private static uint Interleaved<TMode>(uint crc, ReadOnlySpan<byte> data, Span<byte> to)
        where TMode : struct
    {
        bool copy = typeof(TMode) == typeof(WithCopy);
        var words = MemoryMarshal.Cast<byte, ulong>(data);
        var toWords = copy ? MemoryMarshal.Cast<byte, ulong>(to[..(words.Length * 8)]) : default;
        int done = 0;
        while (words.Length - done >= 3 * 16)
        {
            int lane = Math.Min((words.Length - done) / 3, MaxLaneWords);
            crc = ThreeLanes<TMode>(crc, words.Slice(done, 3 * lane), copy ? toWords.Slice(done, 3 * lane) : default, lane);
            done += 3 * lane;
        }
        var tail = data[(done * 8)..];
        if (copy)
        {
            tail.CopyTo(to[(done * 8)..]);
        }
        return AppendSerial(crc, tail);
    }

    /// <summary>
    /// <paramref name="block"/> = lanes A, B, C of <paramref name="lane"/> words each. A continues <paramref name="crc"/>,
    /// B and C start from 0; by linearity CRC(crc, A‖B‖C) = a·x^(128·lane) ⊕ b·x^(64·lane) ⊕ c (mod P). With
    /// <typeparamref name="TMode"/> = <see cref="WithCopy"/> every word read is also stored at the same index of
    /// <paramref name="to"/> (the JIT compiles one body per mode and drops the stores from the other).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static uint ThreeLanes<TMode>(uint crc, ReadOnlySpan<ulong> block, Span<ulong> to, int lane)
        where TMode : struct
    {
        bool copy = typeof(TMode) == typeof(WithCopy);
        var la = block[..lane];
        var lb = block.Slice(lane, lane);
        var lc = block.Slice(2 * lane, lane);
        Span<ulong> ta = default, tb = default, tc = default;
        if (copy)
        {
            ta = to[..lane];
            tb = to.Slice(lane, lane);
            tc = to.Slice(2 * lane, lane);
        }
        ulong a = crc, b = 0, c = 0;
        for (int i = 0; i < lane; i++)
        {
            ulong wa = la[i], wb = lb[i], wc = lc[i];
            if (copy)
            {
                ta[i] = wa;
                tb[i] = wb;
                tc[i] = wc;
            }
            a = Sse42.X64.Crc32(a, wa);
            b = Sse42.X64.Crc32(b, wb);
            c = Sse42.X64.Crc32(c, wc);
        }
        // clmul(v, x^(64·w−33)) reduced by one crc32 step over a zero running value is v·x^(64·w) mod P: A's and B's
        // values moved past the 2·lane and lane words that follow them (the step is linear, so one reduction serves both).
        ulong fold = ClMul((uint)a, Shift[2 * lane]) ^ ClMul((uint)b, Shift[lane]);
        return (uint)(Sse42.X64.Crc32(0UL, fold) ^ c);
    }

    /// <summary><see cref="ThreeLanes{TMode}"/> mode: checksum only.</summary>
    private struct CrcOnly;

    /// <summary><see cref="ThreeLanes{TMode}"/> mode: checksum and copy.</summary>
    private struct WithCopy;

    private static ulong ClMul(uint x, uint k) =>
        Pclmulqdq.CarrylessMultiply(Vector128.CreateScalar((ulong)x), Vector128.CreateScalar((ulong)k), 0x00).ToScalar();

    private static uint[] BuildShift()
    {
        var t = new uint[(2 * MaxLaneWords) + 1];
        // x^31 is bit 0 in the reflected form (bit i stands for x^(31−i)); a crc32 step over a zero u64 multiplies by x^64.
        uint k = 1;
        for (int w = 1; w < t.Length; w++)
        {
            t[w] = k;
            k = BitOperations.Crc32C(k, 0UL);
        }
        return t;
    }
}
