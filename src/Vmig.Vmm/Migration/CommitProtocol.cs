using System.Buffers.Binary;
using System.Diagnostics;
using Vmig.Vmm.Stream;

namespace Vmig.Vmm.Migration;

/// <summary>
/// TargetResult payload (docs/stream-format.md §3, format 2.0): 0 u32 status (0 running, 1 failed); 4 u32 0;
/// 8 u64 target downtime in µs (SwitchoverStart received → vCPUs running); 16 u64 commit wait in µs (TargetReady
/// sent → Commit received: the time the two-phase end added to the downtime); 24 UTF-8 reason. Little-endian.
/// </summary>
public readonly struct TargetResult
{
    /// <summary>Bytes before the reason text.</summary>
    public const int FixedSize = 24;

    public TargetResult(uint status, ulong downtimeMicroseconds, ulong commitWaitMicroseconds, string reason)
    {
        Status = status;
        DowntimeMicroseconds = downtimeMicroseconds;
        CommitWaitMicroseconds = commitWaitMicroseconds;
        Reason = reason;
    }

    /// <summary>0: the VM runs on the target; 1: the target failed and discarded the VM (it never ran its vCPUs).</summary>
    public uint Status { get; }

    public ulong DowntimeMicroseconds { get; }

    public ulong CommitWaitMicroseconds { get; }

    public string Reason { get; }

    /// <summary>The payload bytes (reason cut to <see cref="SectionIo.MaxReasonBytes"/>).</summary>
    public byte[] ToPayload()
    {
        byte[] text = SectionIo.ReasonBytes(Reason);
        var p = new byte[FixedSize + text.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(p, Status);
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(8), DowntimeMicroseconds);
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(16), CommitWaitMicroseconds);
        text.CopyTo(p, FixedSize);
        return p;
    }

    /// <summary>Parses; false if shorter than <see cref="FixedSize"/> or the status is neither 0 nor 1 (never throws).</summary>
    public static bool TryRead(ReadOnlySpan<byte> payload, out TargetResult result)
    {
        result = default;
        if (payload.Length < FixedSize)
        {
            return false;
        }
        uint status = BinaryPrimitives.ReadUInt32LittleEndian(payload);
        if (status > 1)
        {
            return false;
        }
        result = new TargetResult(status, BinaryPrimitives.ReadUInt64LittleEndian(payload[8..]),
            BinaryPrimitives.ReadUInt64LittleEndian(payload[16..]), System.Text.Encoding.UTF8.GetString(payload[FixedSize..]));
        return true;
    }

    /// <summary>Parses the current section's payload or throws <see cref="StreamFormatException"/>.</summary>
    public static TargetResult Read(ReadOnlySpan<byte> payload) =>
        TryRead(payload, out var r) ? r : throw new StreamFormatException($"TargetResult of {payload.Length} bytes is malformed");
}

/// <summary>
/// The two-phase end of a live migration (docs/stream-format.md §4.1). After EndOfState the target loads everything,
/// brings its devices to STOP / RUNNING_P2P with vCPUs parked and sends TargetReady; the source answers Commit and
/// only then gives the VM up; the target runs its vCPUs only after Commit and then sends TargetResult(0).
/// Rules: a source that never got TargetReady resumes; a target that never got Commit discards; a source that sent
/// Commit but got no TargetResult stays paused "in doubt" (the only window left: the Commit or the result lost in
/// flight) until an operator resolves it (<see cref="MigrationRecovery"/>).
/// </summary>
internal static class CommitProtocol
{
    /// <summary>
    /// Source: waits for TargetReady. Throws <see cref="IOException"/> when the target reports a failure, the
    /// connection ends or anything else arrives: the target has not run, so the source rolls back.
    /// </summary>
    public static void AwaitReady(SectionReader reader)
    {
        if (!reader.ReadNext())
        {
            throw new EndOfStreamException("target closed the connection before it was ready to run the VM");
        }
        switch (reader.Type)
        {
            case SectionType.TargetReady:
                return;
            case SectionType.TargetResult:
                var r = TargetResult.Read(reader.Payload);
                // A "running" result before Commit would break the protocol: the target must not run yet.
                throw new IOException(r.Status == 0
                    ? "target reported running before the commit (protocol violation)"
                    : $"target failed before running the VM: {r.Reason}");
            default:
                throw new StreamFormatException($"expected TargetReady, got {reader.Type}");
        }
    }

    /// <summary>Source: sends Commit and flushes. From the first byte on the target may run the VM.</summary>
    public static void SendCommit(SectionWriter writer)
    {
        writer.Write(SectionType.Commit, []);
        writer.Flush();
    }

    /// <summary>
    /// Target: sends TargetReady and waits for Commit (bounded by the connection's receive timeout). Returns the
    /// wait in µs. Throws if anything else arrives or the connection ends: the target must then discard the VM.
    /// </summary>
    public static ulong SendReadyAndAwaitCommit(SectionWriter writer, SectionReader reader)
    {
        writer.Write(SectionType.TargetReady, []);
        writer.Flush();
        long t0 = Stopwatch.GetTimestamp();
        reader.Expect(SectionType.Commit);
        return (ulong)(Stopwatch.GetElapsedTime(t0).TotalMilliseconds * 1000);
    }
}
