using System.Buffers.Binary;
using System.Numerics;
using Vmig.Guest.Accelerator;
using Vmig.Spec.Accelerator;

namespace Vmig.Guest.Workloads;

/// <summary>
/// An accelerator job mix as a guest program: iteration i fills device-memory region i mod R with pattern P(i), then
/// checks the device's CRC-32C of that region and of the next region (filled R-1 iterations earlier, so it has
/// usually crossed a migration in device memory) against the CRC computed here. The job in flight is recorded in the
/// registers, so a migrated copy waits for its completion on the target device.
/// </summary>
/// <remarks>
/// Arguments (kind "accel-mix"): <c>device=SERVICE,gpa=ADDR[,len=BYTES][,regions=R]</c> — SERVICE names an
/// <see cref="AcceleratorDriver"/> registered by the guest setup; ADDR is a page-aligned 4 KiB scratch page for CRC
/// results. Registers: 0 u32 magic "AMIX", 4 u32 phase, 8 u32 slot, 12 u32 regions, 16 u64 iteration, 24 u64 ok,
/// 32 u64 bad, 40 u64 scratch gpa, 48 u64 len, 56..120 service name (UTF-8, zero padded).
/// </remarks>
public sealed class AcceleratorJobMix : IGuestProgram
{
    public const uint Magic = 0x58494D41; // "AMIX"
    private const int NameOffset = 56, NameMax = AcceleratorRegisters.NameMax;

    private readonly AcceleratorDriver _driver;

    private AcceleratorJobMix(AcceleratorDriver driver) => _driver = driver;

    /// <summary>The factory (kind "accel-mix").</summary>
    public static IGuestProgramFactory Factory { get; } = new MixFactory();

    /// <summary>(iterations completed, checks passed, checks failed) from a register block.</summary>
    public static (ulong Iterations, ulong Ok, ulong Bad) Counters(ReadOnlySpan<byte> registers) =>
        (BinaryPrimitives.ReadUInt64LittleEndian(registers[16..]), BinaryPrimitives.ReadUInt64LittleEndian(registers[24..]), BinaryPrimitives.ReadUInt64LittleEndian(registers[32..]));

    /// <inheritdoc/>
    public bool RunSlice(Span<byte> registers)
    {
        uint phase = BinaryPrimitives.ReadUInt32LittleEndian(registers[4..]);
        uint slot = BinaryPrimitives.ReadUInt32LittleEndian(registers[8..]);
        ulong regions = BinaryPrimitives.ReadUInt32LittleEndian(registers[12..]);
        ulong i = BinaryPrimitives.ReadUInt64LittleEndian(registers[16..]);
        ulong scratch = BinaryPrimitives.ReadUInt64LittleEndian(registers[40..]);
        ulong len = BinaryPrimitives.ReadUInt64LittleEndian(registers[48..]);
        ulong cur = (i % regions) * len;
        ulong older = ((i + 1) % regions) * len;
        if (phase == 0)
        {
            slot = _driver.Submit(new AcceleratorJob(AcceleratorOpcode.Fill, AcceleratorJobFlags.None, 0, 0, cur, len, Pattern(i)));
            phase = 1;
        }
        else if (_driver.TryGetCompletion(slot, out var c))
        {
            switch (phase)
            {
                case 1:
                    Count(registers, c.Status == AcceleratorJobStatus.Success);
                    slot = _driver.Submit(new AcceleratorJob(AcceleratorOpcode.Crc32C, AcceleratorJobFlags.None, 0, scratch, cur, len));
                    phase = 2;
                    break;
                case 2:
                    Count(registers, c.Status == AcceleratorJobStatus.Success && c.Result == ExpectedCrc(Pattern(i), len));
                    if (i + 1 >= regions)
                    {
                        slot = _driver.Submit(new AcceleratorJob(AcceleratorOpcode.Crc32C, AcceleratorJobFlags.None, 0, scratch, older, len));
                        phase = 3;
                    }
                    else
                    {
                        phase = 0;
                        i++;
                    }
                    break;
                default:
                    Count(registers, c.Status == AcceleratorJobStatus.Success && c.Result == ExpectedCrc(Pattern(i + 1 - regions), len));
                    phase = 0;
                    i++;
                    break;
            }
        }
        else
        {
            Thread.Sleep(0);
        }
        BinaryPrimitives.WriteUInt32LittleEndian(registers[4..], phase);
        BinaryPrimitives.WriteUInt32LittleEndian(registers[8..], slot);
        BinaryPrimitives.WriteUInt64LittleEndian(registers[16..], i);
        return true;
    }

    private static void Count(Span<byte> registers, bool ok)
    {
        int off = ok ? 24 : 32;
        BinaryPrimitives.WriteUInt64LittleEndian(registers[off..], BinaryPrimitives.ReadUInt64LittleEndian(registers[off..]) + 1);
    }

    private static ulong Pattern(ulong i) => (i + 1) * 0x9E3779B97F4A7C15UL;

    private static uint ExpectedCrc(ulong pattern, ulong len)
    {
        uint crc = 0xFFFFFFFF;
        for (ulong k = 0; k < len / 8; k++)
        {
            crc = BitOperations.Crc32C(crc, pattern);
        }
        return ~crc;
    }

    private sealed class MixFactory : IGuestProgramFactory
    {
        public string Kind => "accel-mix";

        public IGuestProgram Start(GuestEnvironment environment, string arguments, Span<byte> registers)
        {
            ArgumentNullException.ThrowIfNull(environment);
            var kv = SizeParser.ParseKeyValues(arguments);
            string name = kv.GetValueOrDefault("device") ?? throw new FormatException("accel-mix: device= is required");
            ulong gpa = SizeParser.Parse(kv.GetValueOrDefault("gpa"), "gpa");
            ulong len = kv.TryGetValue("len", out string? l) ? SizeParser.Parse(l, "len") : 4096;
            ulong regions = kv.TryGetValue("regions", out string? r) ? SizeParser.Parse(r, "regions") : 8;
            byte[] n = System.Text.Encoding.UTF8.GetBytes(name);
            var driver = environment.GetService<AcceleratorDriver>(name);
            if (n.Length > NameMax || len == 0 || len % 8 != 0 || regions < 2 || regions > uint.MaxValue || len * regions > driver.DeviceMemorySize
                || gpa % 4096 != 0 || gpa + 4096 > environment.Memory.Size)
            {
                throw new FormatException($"accel-mix: bad arguments '{arguments}' (len×regions must fit {driver.DeviceMemorySize} bytes of device memory)");
            }
            BinaryPrimitives.WriteUInt32LittleEndian(registers, Magic);
            BinaryPrimitives.WriteUInt32LittleEndian(registers[12..], (uint)regions);
            BinaryPrimitives.WriteUInt64LittleEndian(registers[40..], gpa);
            BinaryPrimitives.WriteUInt64LittleEndian(registers[48..], len);
            n.CopyTo(registers[NameOffset..]);
            return new AcceleratorJobMix(driver);
        }

        public IGuestProgram Resume(GuestEnvironment environment, ReadOnlySpan<byte> registers) =>
            new AcceleratorJobMix(AcceleratorRegisters.ResumeDriver(environment, registers, Magic, NameOffset, "accel-mix"));
    }
}
