using System.Buffers.Binary;
using System.Diagnostics;

namespace Vmig.Guest.Workloads;

/// <summary>
/// A memory-dirtying job: sweeps a RAM region page by page at a set rate, writing every u64 of page
/// <c>p</c> in pass <c>n</c> as <c>(n &lt;&lt; 32) | p</c>. Its whole state is the register block, so a
/// migrated copy continues the sweep exactly where it stopped, and <see cref="Verify"/> can prove that
/// RAM is consistent with the registers (pages before the cursor hold pass n, the rest pass n-1).
/// </summary>
/// <remarks>
/// Arguments: <c>gpa=ADDR,size=BYTES,rate=MiB/s</c> (sizes take K/M/G; rate 0 = unthrottled).
/// Register block (little-endian): 0 u32 magic 0x5452444D "MDRT"; 4 u32 version 1; 8 u64 region gpa;
/// 16 u64 region size; 24 u64 rate bytes/s; 32 u64 cursor page; 40 u64 pass (≥ 1); 48 u64 bytes written.
/// </remarks>
public sealed class MemoryDirtier : IGuestProgram
{
    /// <summary>Register block magic.</summary>
    public const uint Magic = 0x5452444D;

    private const int PageSize = 4096;
    private const int MaxBytesPerSlice = 256 * 1024;

    private readonly IGuestMemory _memory;
    private readonly byte[] _page = new byte[PageSize];
    // Not durable: the throttle restarts its clock after a migration rather than catching up in a burst.
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private ulong _bytesSinceClock;

    private MemoryDirtier(IGuestMemory memory) => _memory = memory;

    /// <summary>The factory (kind "memory-dirtier").</summary>
    public static IGuestProgramFactory Factory { get; } = new DirtierFactory();

    /// <summary>Bytes written so far, from a register block.</summary>
    public static ulong BytesWritten(ReadOnlySpan<byte> registers) => BinaryPrimitives.ReadUInt64LittleEndian(registers[48..]);

    /// <summary>
    /// Checks every page of the region against the registers. Returns the number of pages whose content is not
    /// what the sweep position says (0 = consistent).
    /// </summary>
    /// <exception cref="InvalidDataException">The registers are not a memory dirtier's.</exception>
    public static long Verify(IGuestMemory memory, ReadOnlySpan<byte> registers)
    {
        ArgumentNullException.ThrowIfNull(memory);
        var r = Regs.Read(registers);
        var page = new byte[PageSize];
        long bad = 0;
        ulong pages = r.Size / PageSize;
        for (ulong p = 0; p < pages; p++)
        {
            ulong pass = p < r.Cursor ? r.Pass : r.Pass - 1;
            ulong expect = pass == 0 ? 0 : (pass << 32) | p;
            memory.Read(r.Gpa + (p * PageSize), page);
            for (int i = 0; i < PageSize; i += 8)
            {
                if (BinaryPrimitives.ReadUInt64LittleEndian(page.AsSpan(i)) != expect)
                {
                    bad++;
                    break;
                }
            }
        }
        return bad;
    }

    /// <inheritdoc/>
    public bool RunSlice(Span<byte> registers)
    {
        var r = Regs.Read(registers);
        ulong budget = MaxBytesPerSlice;
        if (r.Rate != 0)
        {
            ulong allowed = (ulong)(_clock.Elapsed.TotalSeconds * r.Rate);
            // Credit beyond one slice is dropped: after a pause (or a migration) the job resumes at its rate
            // instead of catching up in a burst.
            if (allowed > _bytesSinceClock + MaxBytesPerSlice)
            {
                _bytesSinceClock = allowed - MaxBytesPerSlice;
            }
            if (allowed <= _bytesSinceClock)
            {
                Thread.Sleep(1);
                return true;
            }
            budget = Math.Min(budget, allowed - _bytesSinceClock);
        }
        ulong pages = r.Size / PageSize;
        ulong done = 0;
        while (done < budget)
        {
            ulong value = (r.Pass << 32) | r.Cursor;
            for (int i = 0; i < PageSize; i += 8)
            {
                BinaryPrimitives.WriteUInt64LittleEndian(_page.AsSpan(i), value);
            }
            _memory.Write(r.Gpa + (r.Cursor * PageSize), _page);
            done += PageSize;
            r.Written += PageSize;
            if (++r.Cursor == pages)
            {
                r.Cursor = 0;
                r.Pass++;
            }
        }
        _bytesSinceClock += done;
        r.Write(registers);
        return true;
    }

    private struct Regs
    {
        public ulong Gpa, Size, Rate, Cursor, Pass, Written;

        public static Regs Read(ReadOnlySpan<byte> b)
        {
            if (b.Length < 56 || BinaryPrimitives.ReadUInt32LittleEndian(b) != Magic || BinaryPrimitives.ReadUInt32LittleEndian(b[4..]) != 1)
            {
                throw new InvalidDataException("registers are not a memory-dirtier's (magic/version)");
            }
            var r = new Regs
            {
                Gpa = BinaryPrimitives.ReadUInt64LittleEndian(b[8..]),
                Size = BinaryPrimitives.ReadUInt64LittleEndian(b[16..]),
                Rate = BinaryPrimitives.ReadUInt64LittleEndian(b[24..]),
                Cursor = BinaryPrimitives.ReadUInt64LittleEndian(b[32..]),
                Pass = BinaryPrimitives.ReadUInt64LittleEndian(b[40..]),
                Written = BinaryPrimitives.ReadUInt64LittleEndian(b[48..]),
            };
            if (r.Size < PageSize || r.Size % PageSize != 0 || r.Pass == 0 || r.Cursor >= r.Size / PageSize)
            {
                throw new InvalidDataException("memory-dirtier registers are inconsistent");
            }
            return r;
        }

        public readonly void Write(Span<byte> b)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(b, Magic);
            BinaryPrimitives.WriteUInt32LittleEndian(b[4..], 1);
            BinaryPrimitives.WriteUInt64LittleEndian(b[8..], Gpa);
            BinaryPrimitives.WriteUInt64LittleEndian(b[16..], Size);
            BinaryPrimitives.WriteUInt64LittleEndian(b[24..], Rate);
            BinaryPrimitives.WriteUInt64LittleEndian(b[32..], Cursor);
            BinaryPrimitives.WriteUInt64LittleEndian(b[40..], Pass);
            BinaryPrimitives.WriteUInt64LittleEndian(b[48..], Written);
        }
    }

    private sealed class DirtierFactory : IGuestProgramFactory
    {
        public string Kind => "memory-dirtier";

        public IGuestProgram Start(GuestEnvironment environment, string arguments, Span<byte> registers)
        {
            ArgumentNullException.ThrowIfNull(environment);
            var kv = SizeParser.ParseKeyValues(arguments);
            ulong gpa = kv.TryGetValue("gpa", out string? g) ? SizeParser.Parse(g, "gpa") : 0;
            ulong size = SizeParser.Parse(kv.GetValueOrDefault("size"), "size");
            ulong rate = kv.TryGetValue("rate", out string? rt) ? SizeParser.Parse(rt, "rate") : 0;
            if (gpa % PageSize != 0 || size < PageSize || size % PageSize != 0 || gpa > environment.Memory.Size || size > environment.Memory.Size - gpa)
            {
                throw new FormatException($"memory-dirtier region [{gpa:#x}, +{size}) must be page aligned and inside {environment.Memory.Size} bytes of RAM");
            }
            new Regs { Gpa = gpa, Size = size, Rate = rate * 1024 * 1024, Cursor = 0, Pass = 1, Written = 0 }.Write(registers);
            return new MemoryDirtier(environment.Memory);
        }

        public IGuestProgram Resume(GuestEnvironment environment, ReadOnlySpan<byte> registers)
        {
            ArgumentNullException.ThrowIfNull(environment);
            _ = Regs.Read(registers);
            return new MemoryDirtier(environment.Memory);
        }
    }
}
