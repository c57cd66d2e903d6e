using System.Buffers;

namespace Vmig.Migration;

/// <summary>
/// Server-side owner of one device's migration state (the part of a VFIO variant driver that the kernel core and
/// every driver repeat): walks multi-step SET requests arc by arc through <see cref="IMigrationDevice.Step"/>,
/// records where a failure really left the device, gates the data stream by state, and latches STOP_COPY's end
/// of stream. All calls into the device are serialized by one lock. Initial state RUNNING (ARCHITECTURE §6).
/// </summary>
public sealed class MigrationStateDriver
{
    private readonly Lock _lock = new();
    private readonly IMigrationDevice _device;
    private DeviceState _state = DeviceState.Running;
    private bool _endOfStream;
    // Zero-copy write: the length of the span GetWriteSpan last gave (0 = none outstanding), and the staging buffer
    // that stands in for device memory when the device has no IMigrationDataSink.
    private int _writeSpanLength;
    private byte[]? _writeStaging;

    /// <exception cref="ArgumentException">The device advertises a flag set the UAPI does not define (reference §1.2).</exception>
    public MigrationStateDriver(IMigrationDevice device)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (!MigrationStateMachine.IsValidFlagSet(device.MigrationFlags))
        {
            throw new ArgumentException(
                $"Migration flags {device.MigrationFlags} are not one of SC, SC|P2P, SC|PRE, SC|P2P|PRE.", nameof(device));
        }
        _device = device;
        Flags = device.MigrationFlags;
    }

    /// <summary>The device's flags (DEVICE_FEATURE MIGRATION GET payload).</summary>
    public MigrationFlags Flags { get; }

    /// <summary>The state a MIG_DEVICE_STATE GET reports: where the device really is, including ERROR.</summary>
    public DeviceState State
    {
        get { lock (_lock) { return _state; } }
    }

    /// <summary>
    /// MIG_DEVICE_STATE SET: moves to <paramref name="target"/> one direct arc at a time.
    /// </summary>
    /// <param name="target">Requested state (raw wire value; anything out of range is refused).</param>
    /// <param name="reached">The state afterwards, which GET also reports: the target on success; unchanged when
    /// refused; on a failed arc, the device's <see cref="MigrationException.ReachedState"/>, or the arc's source when
    /// that is null. Requesting the current state is a successful no-op (the kernel's walk loop does nothing), even
    /// in ERROR.</param>
    /// <returns>0; 22 (EINVAL) for an unsupported/ERROR/out-of-range target, a blocked request
    /// (STOP_COPY→PRE_COPY*) or a current state of ERROR; or the errno of the failing arc (EIO if the device gave
    /// none in 1..4096).</returns>
    /// <remarks>An exception other than <see cref="MigrationException"/> from a step is a device bug: the state is
    /// set to ERROR (where the device truly is is unknown) and the exception propagates.</remarks>
    public int SetState(DeviceState target, out DeviceState reached)
    {
        lock (_lock)
        {
            try
            {
                while (_state != target)
                {
                    int rc = MigrationStateMachine.TryGetNextState(Flags, _state, target, out var next);
                    if (rc != 0)
                    {
                        return rc;
                    }
                    try
                    {
                        _device.Step(_state, next);
                    }
                    catch (MigrationException ex)
                    {
                        MoveTo(ReachedAfter(ex, _state));
                        return Sanitize(ex.Errno);
                    }
                    catch
                    {
                        MoveTo(DeviceState.Error);
                        throw;
                    }
                    MoveTo(next);
                }
                return 0;
            }
            finally
            {
                reached = _state;
            }
        }
    }

    /// <summary>
    /// DEVICE_RESET: the only way out of ERROR. Sets RUNNING (kernel semantics, ARCHITECTURE §6) and then calls
    /// <see cref="IMigrationDevice.OnReset"/> so the device drops any open session; later data commands of the old
    /// stream fail with EINVAL because RUNNING is neither a saving state nor RESUMING.
    /// </summary>
    public void Reset()
    {
        lock (_lock)
        {
            MoveTo(DeviceState.Running);
            _device.OnReset();
        }
    }

    /// <summary>
    /// MIG_DATA_READ: copies up to <c>buffer.Length</c> save-stream bytes. <paramref name="count"/> &lt;
    /// <c>buffer.Length</c> means no more data: permanently in STOP_COPY (every later read in this STOP_COPY gives 0
    /// bytes without asking the device), "nothing more for now" in PRE_COPY/PRE_COPY_P2P.
    /// </summary>
    /// <returns>0; 22 (EINVAL) outside {PRE_COPY, PRE_COPY_P2P, STOP_COPY}; the device's errno on a stream failure
    /// (its ReachedState, if given, becomes the state); 5 (EIO) if the device returned a count outside
    /// 0..buffer.Length.</returns>
    public int ReadData(Span<byte> buffer, out int count) => Read(buffer.Length, buffer, null, out count);

    /// <summary>
    /// Zero-copy MIG_DATA_READ: appends up to <paramref name="maxBytes"/> save-stream bytes to
    /// <paramref name="segments"/> — the device's own segments when it implements <see cref="IMigrationDataSource"/>,
    /// otherwise one pooled buffer filled by <see cref="IMigrationDevice.ReadData"/>. Send them before the next call
    /// into this driver, then <see cref="MigrationGatherList.Clear"/>. Same count, end-of-stream and errno rules as
    /// <see cref="ReadData(Span{byte}, out int)"/>; on an error, discard whatever the device appended (Clear).
    /// </summary>
    public int ReadDataGather(int maxBytes, MigrationGatherList segments, out int count)
    {
        ArgumentNullException.ThrowIfNull(segments);
        ArgumentOutOfRangeException.ThrowIfNegative(maxBytes);
        return Read(maxBytes, default, segments, out count);
    }

    private int Read(int max, Span<byte> buffer, MigrationGatherList? segments, out int count)
    {
        count = 0;
        lock (_lock)
        {
            if (!MigrationGate.CanReadData(_state))
            {
                return Errno.EINVAL;
            }
            if (_endOfStream || max == 0)
            {
                return 0;
            }
            int n;
            long before = segments?.TotalBytes ?? 0;
            try
            {
                if (segments is null)
                {
                    n = _device.ReadData(buffer);
                }
                else if (_device is IMigrationDataSource source)
                {
                    n = source.ReadDataGather(max, segments);
                    if (segments.TotalBytes - before != n)
                    {
                        n = -1;
                    }
                }
                else
                {
                    var staging = segments.RentStaging(max);
                    n = _device.ReadData(staging.Span[..max]);
                    if (n >= 0 && n <= max)
                    {
                        segments.Add(staging[..n]);
                    }
                }
            }
            catch (MigrationException ex)
            {
                MoveTo(ReachedAfter(ex, _state));
                return Sanitize(ex.Errno);
            }
            if (n < 0 || n > max)
            {
                return Errno.EIO;
            }
            if (n < max && _state == DeviceState.StopCopy)
            {
                _endOfStream = true;
            }
            count = n;
            return 0;
        }
    }

    /// <summary>MIG_DATA_WRITE: hands resume-stream bytes (any segmentation) to the device.</summary>
    /// <returns>0; 22 (EINVAL) outside RESUMING; or the device's errno (its ReachedState, if given, becomes the state).</returns>
    public int WriteData(ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            if (!MigrationGate.CanWriteData(_state))
            {
                return Errno.EINVAL;
            }
            try
            {
                _device.WriteData(data);
            }
            catch (MigrationException ex)
            {
                MoveTo(ReachedAfter(ex, _state));
                return Sanitize(ex.Errno);
            }
            return 0;
        }
    }

    /// <summary>
    /// Zero-copy MIG_DATA_WRITE, step 1: where the next resume-stream bytes go — a span of the device's own memory when
    /// it implements <see cref="IMigrationDataSink"/>, otherwise a staging buffer of this driver that
    /// <see cref="AdvanceWrite"/> hands to <see cref="IMigrationDevice.WriteData"/>. Receive into it, then call
    /// <see cref="AdvanceWrite"/> with the count, before any other call into this driver.
    /// </summary>
    /// <param name="sizeHint">Bytes still to come in the current message (1 … max_data_xfer_size).</param>
    /// <param name="span">1 to <paramref name="sizeHint"/> bytes (never more), empty on an error.</param>
    /// <returns>0; 22 (EINVAL) outside RESUMING; or the device's errno (EFBIG past the stream's end, EINVAL after a
    /// failure…; its ReachedState, if given, becomes the state).</returns>
    public int GetWriteSpan(int sizeHint, out Span<byte> span)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(sizeHint);
        span = default;
        lock (_lock)
        {
            _writeSpanLength = 0;
            if (!MigrationGate.CanWriteData(_state))
            {
                return Errno.EINVAL;
            }
            if (_device is IMigrationDataSink sink)
            {
                try
                {
                    span = sink.GetWriteSpan(sizeHint);
                }
                catch (MigrationException ex)
                {
                    MoveTo(ReachedAfter(ex, _state));
                    return Sanitize(ex.Errno);
                }
                if (span.IsEmpty)
                {
                    return Errno.EIO;
                }
                if (span.Length > sizeHint)
                {
                    span = span[..sizeHint];
                }
            }
            else
            {
                if (_writeStaging is null || _writeStaging.Length < sizeHint)
                {
                    ReturnStaging();
                    _writeStaging = ArrayPool<byte>.Shared.Rent(sizeHint);
                }
                span = _writeStaging.AsSpan(0, sizeHint);
            }
            _writeSpanLength = span.Length;
            return 0;
        }
    }

    /// <summary>
    /// Zero-copy MIG_DATA_WRITE, step 2: <paramref name="count"/> bytes (1 … the span's length) arrived at the start of
    /// the span <see cref="GetWriteSpan"/> gave; the device parses and checks them.
    /// </summary>
    /// <returns>0; 22 (EINVAL) outside RESUMING; 5 (EIO) for a count the last span cannot hold (or no span given); or
    /// the device's errno (its ReachedState, if given, becomes the state).</returns>
    public int AdvanceWrite(int count)
    {
        lock (_lock)
        {
            int given = _writeSpanLength;
            _writeSpanLength = 0;
            if (!MigrationGate.CanWriteData(_state))
            {
                return Errno.EINVAL;
            }
            if (count <= 0 || count > given)
            {
                return Errno.EIO;
            }
            try
            {
                if (_device is IMigrationDataSink sink)
                {
                    sink.AdvanceWrite(count);
                }
                else
                {
                    _device.WriteData(_writeStaging.AsSpan(0, count));
                }
            }
            catch (MigrationException ex)
            {
                MoveTo(ReachedAfter(ex, _state));
                return Sanitize(ex.Errno);
            }
            return 0;
        }
    }

    /// <summary>Pre-copy info (initial_bytes, dirty_bytes); valid only in PRE_COPY/PRE_COPY_P2P (reference §2.3).</summary>
    /// <returns>0, or 22 (EINVAL) in any other state.</returns>
    public int GetPrecopyInfo(out PrecopyInfo info)
    {
        info = default;
        lock (_lock)
        {
            if (_state is not (DeviceState.PreCopy or DeviceState.PreCopyP2P))
            {
                return Errno.EINVAL;
            }
            info = _device.GetPrecopyInfo();
            return 0;
        }
    }

    /// <summary>MIG_DATA_SIZE: the device's STOP_COPY size estimate in bytes; any state (reference §2.4).</summary>
    public ulong GetStopCopySize()
    {
        lock (_lock)
        {
            return _device.GetStopCopySize();
        }
    }

    private void ReturnStaging()
    {
        if (_writeStaging is not null)
        {
            ArrayPool<byte>.Shared.Return(_writeStaging);
            _writeStaging = null;
        }
    }

    private void MoveTo(DeviceState state)
    {
        if (state != DeviceState.Resuming)
        {
            // The adapter's staging buffer belongs to one resume session.
            ReturnStaging();
            _writeSpanLength = 0;
        }
        // End of stream belongs to one STOP_COPY visit; STOP_COPY can only be left, so any change resets it.
        if (state != _state)
        {
            _endOfStream = false;
        }
        _state = state;
    }

    // A device naming a state it cannot be in (out of range, or an optional state it lacks) is not believed.
    private DeviceState ReachedAfter(MigrationException ex, DeviceState unchanged) => ex.ReachedState switch
    {
        null => unchanged,
        DeviceState.Error => DeviceState.Error,
        { } s when MigrationStateMachine.IsSupported(Flags, s) => s,
        _ => DeviceState.Error,
    };

    private static int Sanitize(int errno) => errno is > 0 and <= Errno.Max ? errno : Errno.EIO;
}
