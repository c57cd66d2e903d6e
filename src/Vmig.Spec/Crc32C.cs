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
/// Linux's crc32c-intel. With VPCLMULQDQ and AVX-512 as well, inputs of at least <see cref="MinFolded"/> bytes are
/// folded 256 bytes a step with 512-bit carry-less multiplies instead (Linux's and zlib-ng's method for large buffers;
/// the crc32 instruction's one 8-byte word a cycle is the bound of the three lanes, four 512-bit folds are not
/// bound by it), and only the last 128 bits and the tail go through crc32. Elsewhere one chain of
/// <see cref="BitOperations.Crc32C(uint, ulong)"/> (hardware where the CPU has it, a table otherwise). All give
/// bit-identical results.
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

    /// <summary>Smallest input (bytes) that takes the folding path: one 256-byte block to start from and at least one to fold in.</summary>
    internal const int MinFolded = 2 * FoldBlock;

    /// <summary>Bytes one folding step consumes: four 512-bit accumulators.</summary>
    private const int FoldBlock = 256;

    /// <summary>
    /// Folding constants for the 512-bit path, each pair (x^(d+32) mod P, x^(d−32) mod P) reflected and shifted left
    /// one bit (33 bits), for fold distances d = 2048 (the four-accumulator step), 512 (accumulator into the next),
    /// 384, 256 and 128 (the 128-bit lanes of the last accumulator into its last lane).
    /// </summary>
    private static readonly ulong[] FoldK = BuildFoldConstants();

    /// <summary>True when the 512-bit carry-less-multiply folding path is used on this CPU (VPCLMULQDQ + AVX-512).</summary>
    public static bool IsFolded => IsInterleaved && Pclmulqdq.V512.IsSupported && Avx512F.IsSupported;

    /// <summary>CRC-32C of <paramref name="data"/>.</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => Finish(Append(Start, data));

    /// <summary>Feeds <paramref name="data"/> into a running (non-inverted) value; start with <see cref="Start"/>, end with <see cref="Finish"/>.</summary>
    public static uint Append(uint crc, ReadOnlySpan<byte> data) =>
        data.Length >= MinFolded && IsFolded ? Folded<CrcOnly>(crc, data, default) : AppendUnfolded(crc, data);

    /// <summary>
    /// <see cref="Append"/> without the folding path — what a CPU without VPCLMULQDQ/AVX-512 runs, and the folding
    /// path's tail; internal so the tests cover the three-lane path on CPUs that have the folding one.
    /// </summary>
    internal static uint AppendUnfolded(uint crc, ReadOnlySpan<byte> data) =>
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
        return source.Length >= MinFolded && IsFolded ? Folded<WithCopy>(crc, source, destination) : AppendCopyUnfolded(crc, source, destination);
    }

    /// <summary><see cref="AppendCopy"/> without the folding path (see <see cref="AppendUnfolded"/>); <paramref name="destination"/> is at least as long as <paramref name="source"/>.</summary>
    internal static uint AppendCopyUnfolded(uint crc, ReadOnlySpan<byte> source, Span<byte> destination)
    {
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

    /// <summary>
    /// The folding method of Intel's "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction" (2009),
    /// 512 bits at a time: four 512-bit accumulators hold the first 256 bytes (the running value XORed into the first
    /// 4 bytes, which for a reflected CRC is the same as continuing from it); each further 256-byte block is added to
    /// the accumulators multiplied forward by x^2048 (each 128-bit lane's two halves by x^(2048±32), carry-less, which
    /// keeps it congruent mod P in 128 bits). The four accumulators then fold into the last, its four lanes into its
    /// last lane, and that 128-bit remainder, congruent to everything before it, goes through two crc32 steps from 0;
    /// the &lt; 256-byte tail follows through the three-lane or single path. With <typeparamref name="TMode"/> =
    /// <see cref="WithCopy"/> every 64 bytes loaded are also stored at the same offset of <paramref name="to"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static uint Folded<TMode>(uint crc, ReadOnlySpan<byte> data, Span<byte> to)
        where TMode : struct
    {
        bool copy = typeof(TMode) == typeof(WithCopy);
        ref byte src = ref MemoryMarshal.GetReference(data);
        ref byte dst = ref MemoryMarshal.GetReference(to);
        var k2048 = Vector512.Create(FoldK[0], FoldK[1], FoldK[0], FoldK[1], FoldK[0], FoldK[1], FoldK[0], FoldK[1]);
        var x0 = Vector512.LoadUnsafe(ref src, 0).AsUInt64();
        var x1 = Vector512.LoadUnsafe(ref src, 64).AsUInt64();
        var x2 = Vector512.LoadUnsafe(ref src, 128).AsUInt64();
        var x3 = Vector512.LoadUnsafe(ref src, 192).AsUInt64();
        if (copy)
        {
            x0.AsByte().StoreUnsafe(ref dst, 0);
            x1.AsByte().StoreUnsafe(ref dst, 64);
            x2.AsByte().StoreUnsafe(ref dst, 128);
            x3.AsByte().StoreUnsafe(ref dst, 192);
        }
        x0 ^= Vector512.CreateScalar((ulong)crc);
        nuint at = FoldBlock;
        nuint end = (nuint)(data.Length - (data.Length % FoldBlock));
        for (; at < end; at += FoldBlock)
        {
            var y0 = Vector512.LoadUnsafe(ref src, at).AsUInt64();
            var y1 = Vector512.LoadUnsafe(ref src, at + 64).AsUInt64();
            var y2 = Vector512.LoadUnsafe(ref src, at + 128).AsUInt64();
            var y3 = Vector512.LoadUnsafe(ref src, at + 192).AsUInt64();
            if (copy)
            {
                y0.AsByte().StoreUnsafe(ref dst, at);
                y1.AsByte().StoreUnsafe(ref dst, at + 64);
                y2.AsByte().StoreUnsafe(ref dst, at + 128);
                y3.AsByte().StoreUnsafe(ref dst, at + 192);
            }
            x0 = Fold512(x0, k2048, y0);
            x1 = Fold512(x1, k2048, y1);
            x2 = Fold512(x2, k2048, y2);
            x3 = Fold512(x3, k2048, y3);
        }
        var k512 = Vector512.Create(FoldK[2], FoldK[3], FoldK[2], FoldK[3], FoldK[2], FoldK[3], FoldK[2], FoldK[3]);
        x1 = Fold512(x0, k512, x1);
        x2 = Fold512(x1, k512, x2);
        x3 = Fold512(x2, k512, x3);
        var r = Fold128(x3.GetLower().GetLower(), Vector128.Create(FoldK[4], FoldK[5]), x3.GetUpper().GetUpper());
        r = Fold128(x3.GetLower().GetUpper(), Vector128.Create(FoldK[6], FoldK[7]), r);
        r = Fold128(x3.GetUpper().GetLower(), Vector128.Create(FoldK[8], FoldK[9]), r);
        crc = (uint)Sse42.X64.Crc32(Sse42.X64.Crc32(0UL, r.GetElement(0)), r.GetElement(1));
        var tail = data[(int)end..];
        if (copy)
        {
            tail.CopyTo(to[(int)end..]);
        }
        return AppendUnfolded(crc, tail);
    }

    /// <summary>Each 128-bit lane of <paramref name="x"/> multiplied forward (low half by k[0], high half by k[1]) and added to <paramref name="y"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<ulong> Fold512(Vector512<ulong> x, Vector512<ulong> k, Vector512<ulong> y) =>
        Pclmulqdq.V512.CarrylessMultiply(x, k, 0x00) ^ Pclmulqdq.V512.CarrylessMultiply(x, k, 0x11) ^ y;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<ulong> Fold128(Vector128<ulong> x, Vector128<ulong> k, Vector128<ulong> y) =>
        Pclmulqdq.CarrylessMultiply(x, k, 0x00) ^ Pclmulqdq.CarrylessMultiply(x, k, 0x11) ^ y;

    /// <summary>x^e mod P, reflected (bit i is the coefficient of x^(31−i)), shifted left one bit.</summary>
    private static ulong XPowShifted(int e)
    {
        uint v = 0x8000_0000; // x^0
        for (int i = 0; i < e; i++)
        {
            v = (v & 1) != 0 ? (v >> 1) ^ 0x82F6_3B78u : v >> 1;
        }
        return (ulong)v << 1;
    }

    private static ulong[] BuildFoldConstants()
    {
        int[] distances = [2048, 512, 384, 256, 128];
        var k = new ulong[2 * distances.Length];
        for (int i = 0; i < distances.Length; i++)
        {
            k[2 * i] = XPowShifted(distances[i] + 32);
            k[(2 * i) + 1] = XPowShifted(distances[i] - 32);
        }
        return k;
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
