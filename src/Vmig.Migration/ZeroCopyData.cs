using System.Buffers;

namespace Vmig.Migration;

/// <summary>
/// Optional zero-copy resume path of an <see cref="IMigrationDevice"/> (target side), PipeWriter-like: the server
/// asks where the next resume-stream bytes go (<see cref="GetWriteSpan"/>), receives them from the socket straight
/// into that span, then says how many arrived (<see cref="AdvanceWrite"/>); repeated until a MIG_DATA_WRITE's payload
/// is consumed. The device's record parser decides where bytes go: a small header staging buffer of its own, or a
/// slice of its state (device memory). A device that does not implement this is driven through
/// <see cref="IMigrationDevice.WriteData"/> (one copy from the server's receive buffer).
/// </summary>
/// <remarks>
/// Only called in RESUMING, serialized with every other call into the device (<see cref="MigrationStateDriver"/>).
/// The same stream may also arrive through <see cref="IMigrationDevice.WriteData"/> (a message the server had to
/// buffer): both paths must feed one parser, in order. Bytes land in the span BEFORE the device can check them: a
/// device that writes state in place must treat a failed check as a failed load (every later write fails; RESUMING→STOP
/// fails into ERROR, so the device never runs with those bytes; only DEVICE_RESET leaves).
/// </remarks>
public interface IMigrationDataSink
{
    /// <summary>
    /// The memory the next resume-stream bytes go to: 1 to <paramref name="sizeHint"/> bytes (more is allowed; the
    /// caller uses at most <paramref name="sizeHint"/>). Valid until the next call into the device.
    /// </summary>
    /// <param name="sizeHint">Bytes still to come in the current message (≥ 1).</param>
    /// <exception cref="MigrationException">The stream cannot take more bytes: EFBIG past its end, EINVAL after a
    /// failure or after the stream's end.</exception>
    Span<byte> GetWriteSpan(int sizeHint);

    /// <summary>
    /// <paramref name="count"/> bytes (1 ≤ count ≤ the last span's length) now hold stream data at the start of the span
    /// from the last <see cref="GetWriteSpan"/>: parse and check them.
    /// </summary>
    /// <exception cref="MigrationException">The bytes are invalid (EINVAL: bad header, CRC mismatch…); the load is dead.</exception>
    void AdvanceWrite(int count);
}

/// <summary>
/// Optional zero-copy save path of an <see cref="IMigrationDevice"/> (source side): instead of copying save-stream
/// bytes into a buffer, the device appends segments to a <see cref="MigrationGatherList"/> — slices of its state (a
/// memfd mapping: <c>Mapping.GetMemory</c>) and small headers of its own — that the server sends with one vectored
/// sendmsg. A device that must copy (its state changes while it runs: PRE_COPY) copies into
/// <see cref="MigrationGatherList.RentStaging"/> instead, exactly once.
/// </summary>
/// <remarks>Segments must stay valid and unchanged until the next call into the device (the server sends them before
/// that). Same end-of-stream rule as <see cref="IMigrationDevice.ReadData"/>: fewer than asked means "no more".</remarks>
public interface IMigrationDataSource
{
    /// <summary>Appends up to <paramref name="maxBytes"/> save-stream bytes to <paramref name="segments"/>; returns the
    /// count appended (= the growth of <see cref="MigrationGatherList.TotalBytes"/>).</summary>
    /// <exception cref="MigrationException">The stream failed (errno in <see cref="MigrationException.Errno"/>).</exception>
    int ReadDataGather(int maxBytes, MigrationGatherList segments);
}

/// <summary>
/// The segments of one MIG_DATA_READ reply (in order) and any pooled staging they use. Reused: <see cref="Clear"/>
/// after the send returns the staging buffers to the pool.
/// </summary>
public sealed class MigrationGatherList
{
    private readonly List<ReadOnlyMemory<byte>> _segments = [];
    private readonly List<byte[]> _rented = [];

    /// <summary>Bytes in all segments.</summary>
    public long TotalBytes { get; private set; }

    /// <summary>Number of segments.</summary>
    public int Count => _segments.Count;

    /// <summary>The segments, in stream order.</summary>
    public ReadOnlySpan<ReadOnlyMemory<byte>> Segments => System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_segments);

    /// <summary>Appends <paramref name="segment"/> (empty ones are dropped).</summary>
    public void Add(ReadOnlyMemory<byte> segment)
    {
        if (segment.IsEmpty)
        {
            return;
        }
        TotalBytes += segment.Length;
        _segments.Add(segment);
    }

    /// <summary>A pooled buffer of at least <paramref name="minimumLength"/> bytes that lives until <see cref="Clear"/>
    /// (copy into it, then <see cref="Add"/> the part used).</summary>
    public Memory<byte> RentStaging(int minimumLength)
    {
        var b = ArrayPool<byte>.Shared.Rent(Math.Max(1, minimumLength));
        _rented.Add(b);
        return b;
    }

    /// <summary>Drops the segments and returns the staging buffers.</summary>
    public void Clear()
    {
        _segments.Clear();
        TotalBytes = 0;
        foreach (var b in _rented)
        {
            ArrayPool<byte>.Shared.Return(b);
        }
        _rented.Clear();
    }

    /// <summary>Copies every segment, in order, into <paramref name="destination"/> (tests; the buffered fallback).</summary>
    public int CopyTo(Span<byte> destination)
    {
        int at = 0;
        foreach (var s in _segments)
        {
            s.Span.CopyTo(destination[at..]);
            at += s.Length;
        }
        return at;
    }
}
