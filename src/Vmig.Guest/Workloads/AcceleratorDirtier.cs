using System.Buffers.Binary;
using System.Diagnostics;
using Vmig.Guest.Accelerator;
using Vmig.Spec.Accelerator;

namespace Vmig.Guest.Workloads;

/// <summary>
/// Guest job "accel-dirtier": sweeps the accelerator's device memory [0, SIZE) with Fill jobs of CHUNK bytes at RATE
/// MiB/s, one job in flight, so device memory is dirtied at a set rate (what device pre-copy must keep up with; issue
/// 7's second downtime goal dirties 1 GiB at 100 MiB/s). Sweep k fills chunk i with the 64-bit pattern
/// (bytes filled before the job ÷ CHUNK + 1) × 0x9E3779B97F4A7C15 (<see cref="PatternFor"/>). All state is in the
/// registers; a migrated copy waits for its in-flight job on the target device. The rate is paced by a clock that is
/// not migrated: after a migration it restarts rather than catching up in a burst.
/// </summary>
/// <remarks>
/// Arguments (kind "accel-dirtier"): <c>device=SERVICE,size=BYTES,rate=MiB/s[,chunk=BYTES]</c> — SERVICE names an
/// <see cref="AcceleratorDriver"/> registered by the guest setup; SIZE a multiple of CHUNK within the device memory;
/// CHUNK (default 1 MiB) a multiple of 8; RATE &gt; 0. Bad arguments throw <see cref="FormatException"/>. Registers:
/// 0 u32 magic "ADRT", 4 u32 phase (0 idle, 1 job in flight), 8 u32 slot, 16 u64 size, 24 u64 rate bytes/s, 32 u64
/// chunk, 40 u64 cursor (chunk index), 48 u64 bytes filled, 56 u64 jobs ok, 64 u64 jobs failed, 72..136 service name
/// (UTF-8, zero padded).
/// </remarks>
public sealed class AcceleratorDirtier : IGuestProgram
{
    /// <summary>The program kind.</summary>
    public const string Kind = "accel-dirtier";
    private const uint Magic = 0x54524441; // "ADRT"
    private const int NameOffset = 72, NameMax = AcceleratorRegisters.NameMax;

    private readonly AcceleratorDriver _driver;
    // Not durable: after a migration the rate restarts rather than catching up in a burst.
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private ulong _sinceClock;

    private AcceleratorDirtier(AcceleratorDriver driver) => _driver = driver;

    /// <summary>The factory (kind "accel-dirtier").</summary>
    public static IGuestProgramFactory Factory { get; } = new DirtierFactory();

    /// <summary>The 64-bit fill pattern of the job that starts after <paramref name="bytesFilled"/> bytes (registers offset 48).</summary>
    public static ulong PatternFor(ulong bytesFilled, ulong chunk) => (bytesFilled / chunk + 1) * 0x9E3779B97F4A7C15UL;

    /// <summary>(bytes filled, jobs ok, jobs failed) from a register block.</summary>
    public static (ulong Bytes, ulong Ok, ulong Bad) Counters(ReadOnlySpan<byte> r) =>
        (BinaryPrimitives.ReadUInt64LittleEndian(r[48..]), BinaryPrimitives.ReadUInt64LittleEndian(r[56..]), BinaryPrimitives.ReadUInt64LittleEndian(r[64..]));

    /// <inheritdoc/>
    public bool RunSlice(Span<byte> r)
    {
        uint phase = BinaryPrimitives.ReadUInt32LittleEndian(r[4..]);
        ulong size = BinaryPrimitives.ReadUInt64LittleEndian(r[16..]);
        ulong rate = BinaryPrimitives.ReadUInt64LittleEndian(r[24..]);
        ulong chunk = BinaryPrimitives.ReadUInt64LittleEndian(r[32..]);
        ulong cursor = BinaryPrimitives.ReadUInt64LittleEndian(r[40..]);
        if (phase == 1)
        {
            uint slot = BinaryPrimitives.ReadUInt32LittleEndian(r[8..]);
            if (!_driver.TryGetCompletion(slot, out var c))
            {
                Thread.Sleep(0);
                return true;
            }
            bool ok = c.Status == AcceleratorJobStatus.Success;
            int off = ok ? 56 : 64;
            BinaryPrimitives.WriteUInt64LittleEndian(r[off..], BinaryPrimitives.ReadUInt64LittleEndian(r[off..]) + 1);
            if (ok)
            {
                BinaryPrimitives.WriteUInt64LittleEndian(r[48..], BinaryPrimitives.ReadUInt64LittleEndian(r[48..]) + chunk);
            }
            BinaryPrimitives.WriteUInt64LittleEndian(r[40..], (cursor + 1) % (size / chunk));
            BinaryPrimitives.WriteUInt32LittleEndian(r[4..], 0);
            return true;
        }
        ulong allowed = (ulong)(_clock.Elapsed.TotalSeconds * rate);
        if (allowed > _sinceClock + chunk)
        {
            _sinceClock = allowed - chunk;
        }
        if (allowed < _sinceClock + chunk)
        {
            Thread.Sleep(1);
            return true;
        }
        _sinceClock += chunk;
        ulong pattern = PatternFor(BinaryPrimitives.ReadUInt64LittleEndian(r[48..]), chunk);
        uint s = _driver.Submit(new AcceleratorJob(AcceleratorOpcode.Fill, AcceleratorJobFlags.None, 0, 0, cursor * chunk, chunk, pattern));
        BinaryPrimitives.WriteUInt32LittleEndian(r[8..], s);
        BinaryPrimitives.WriteUInt32LittleEndian(r[4..], 1);
        return true;
    }

    private sealed class DirtierFactory : IGuestProgramFactory
    {
        public string Kind => AcceleratorDirtier.Kind;

        public IGuestProgram Start(GuestEnvironment environment, string arguments, Span<byte> registers)
        {
            ArgumentNullException.ThrowIfNull(environment);
            var kv = SizeParser.ParseKeyValues(arguments);
            string name = kv.GetValueOrDefault("device") ?? throw new FormatException("accel-dirtier: device= is required");
            var driver = environment.GetService<AcceleratorDriver>(name);
            ulong size = SizeParser.Parse(kv.GetValueOrDefault("size"), "size");
            ulong rate = SizeParser.Parse(kv.GetValueOrDefault("rate"), "rate") * (1UL << 20);
            ulong chunk = kv.TryGetValue("chunk", out string? c) ? SizeParser.Parse(c, "chunk") : 1UL << 20;
            byte[] n = System.Text.Encoding.UTF8.GetBytes(name);
            if (n.Length > NameMax || chunk == 0 || chunk % 8 != 0 || size < chunk || size % chunk != 0 || size > driver.DeviceMemorySize || rate == 0)
            {
                throw new FormatException($"accel-dirtier: bad arguments '{arguments}' (size a multiple of chunk within {driver.DeviceMemorySize} bytes, rate > 0)");
            }
            BinaryPrimitives.WriteUInt32LittleEndian(registers, Magic);
            BinaryPrimitives.WriteUInt64LittleEndian(registers[16..], size);
            BinaryPrimitives.WriteUInt64LittleEndian(registers[24..], rate);
            BinaryPrimitives.WriteUInt64LittleEndian(registers[32..], chunk);
            n.CopyTo(registers[NameOffset..]);
            return new AcceleratorDirtier(driver);
        }

        public IGuestProgram Resume(GuestEnvironment environment, ReadOnlySpan<byte> registers) =>
            new AcceleratorDirtier(AcceleratorRegisters.ResumeDriver(environment, registers, Magic, NameOffset, "accel-dirtier"));
    }
}
