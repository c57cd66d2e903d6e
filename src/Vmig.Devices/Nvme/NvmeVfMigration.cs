using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Devices.Pci;
using Vmig.Migration;
using Vmig.Spec.Nvme;
using Vmig.VfioUser.Protocol;
using Vmig.VfioUser.Server;

namespace Vmig.Devices.Nvme;

/// <summary>
/// Interface 1 (ARCHITECTURE §3): the migration driver of one secondary controller. It answers the VF socket's
/// migration features by issuing TP4159 operations on the primary controller naming the secondary's CNTLID, never by
/// touching the VF. Flags STOP_COPY | P2P | PRE_COPY. Arcs (reference §5.6.2 mapping):
/// RUNNING→RUNNING_P2P and PRE_COPY→PRE_COPY_P2P = Suspend Notification (the controller does no peer-to-peer DMA);
/// RUNNING_P2P→STOP = Suspend; STOP→RUNNING_P2P = Resume; STOP→STOP_COPY = Get Controller State;
/// RESUMING→STOP = Set Controller State; RUNNING→PRE_COPY = the early compatibility header only;
/// PRE_COPY_P2P→STOP_COPY = Suspend, then the state. DMA_LOGGING_START/STOP = Track Send / Track Memory Changes
/// start/stop, DMA_LOGGING_REPORT = Track Receive (see <see cref="Report"/>): the VF's DMA space hands its logging to
/// this driver (<see cref="DmaSpace.LoggingDriver"/>), so the generic write log is reached only through the primary.
/// </summary>
/// <remarks>
/// Stream: records of {u32 magic "NVMR", u16 kind (1 profile, 2 controller state, 3 the VF's PCI config state), u16 0,
/// u32 length, u32 CRC32C of the payload} + payload. The profile record comes first so a target refuses an
/// incompatible source before any state moves (its WriteData throws EINVAL naming the difference). The PCI config
/// state (command register, MSI-X table and PBA: what the guest programmed) is the device host's emulation of the VF's
/// config space, not controller state, so it is read from the function, not through the primary.
/// </remarks>
internal sealed class NvmeVfMigration(NvmeMigrationController primary, NvmeFunction function, ushort cntlid) : IMigrationDevice, IDmaLoggingDriver
{
    /// <summary>Descriptors asked for per Track Receive (a 64 KiB host buffer's worth).</summary>
    private const int TrackReceiveRuns = (64 * 1024 - TrackedMemoryChangesHeader.Size) / TrackedMemoryChange.Size;

    private readonly object _logGate = new();

    /// <summary>DMA_LOGGING granule in bytes; 0 while not logging.</summary>
    private ulong _logGranule;

    /// <summary>
    /// 4 KiB pages Track Receive reported that no DMA_LOGGING_REPORT has asked for yet, as a sparse bitmap: key = page
    /// number / 64, bit = page number % 64. Track Receive reads and clears everything the primary logged, while a
    /// report asks about one range; the rest waits here for the report that covers it.
    /// </summary>
    private readonly Dictionary<ulong, ulong> _pendingPages = [];

    public const uint RecordMagic = 0x524D564E; // "NVMR"
    public const int RecordHeaderSize = 16;
    private const ushort KindProfile = 1;
    private const ushort KindState = 2;
    private const ushort KindPciConfig = 3;

    private MemoryStream? _save;
    private long _saveRead;
    private MemoryStream? _load;
    private byte[]? _loadedState;
    private byte[]? _loadedConfig;

    public MigrationFlags MigrationFlags => MigrationFlags.StopCopy | MigrationFlags.P2P | MigrationFlags.PreCopy;

    public void Step(DeviceState from, DeviceState to)
    {
        switch (from, to)
        {
            case (DeviceState.Running, DeviceState.RunningP2P):
            case (DeviceState.PreCopy, DeviceState.PreCopyP2P):
                Check(primary.Suspend(cntlid, SuspendType.Notification), "suspend notification");
                break;
            case (DeviceState.RunningP2P, DeviceState.Running):
            case (DeviceState.PreCopyP2P, DeviceState.PreCopy):
                break;
            case (DeviceState.RunningP2P, DeviceState.Stop):
                Check(primary.Suspend(cntlid, SuspendType.Suspend), "suspend");
                break;
            case (DeviceState.Stop, DeviceState.RunningP2P):
                Check(primary.Resume(cntlid), "resume");
                break;
            case (DeviceState.Stop, DeviceState.StopCopy):
                OpenSave();
                AppendState();
                break;
            case (DeviceState.StopCopy, DeviceState.Stop):
            case (DeviceState.PreCopy, DeviceState.Running):
            case (DeviceState.PreCopyP2P, DeviceState.RunningP2P):
                _save = null;
                break;
            case (DeviceState.Running, DeviceState.PreCopy):
            case (DeviceState.RunningP2P, DeviceState.PreCopyP2P):
                OpenSave();
                break;
            case (DeviceState.PreCopyP2P, DeviceState.StopCopy):
                Check(primary.Suspend(cntlid, SuspendType.Suspend), "suspend");
                AppendState();
                break;
            case (DeviceState.Stop, DeviceState.Resuming):
                _load = new MemoryStream();
                _loadedState = null;
                break;
            case (DeviceState.Resuming, DeviceState.Stop):
                Commit();
                break;
            default:
                throw new MigrationException(Errno.EINVAL, $"{from} → {to} is not a direct arc");
        }
        // Shadow-doorbell polling only while the guest runs: from RUNNING_P2P on, the VMM has paused the vCPUs and
        // needs both cores for stop-copy (a poller yielding for its idle window competed with it: the downtime grew).
        // Device-host emulation, not controller state, so it is set on the function, not through the primary.
        function.Controller.SetPollingAllowed(to is DeviceState.Running or DeviceState.PreCopy);
    }

    private static void Check(NvmeStatus st, string what)
    {
        if (!st.IsSuccess)
        {
            throw new MigrationException(Errno.EIO, $"NVMe {what} on the primary failed: {st}");
        }
    }

    private void OpenSave()
    {
        _save = new MemoryStream();
        _saveRead = 0;
        WriteRecord(_save, KindProfile, primary.ProfileOf(cntlid).Encode());
    }

    private void AppendState()
    {
        var save = _save ?? throw new MigrationException(Errno.EINVAL, "no save session");
        Check(primary.GetControllerState(cntlid, out byte[] state), "get controller state");
        WriteRecord(save, KindState, state);
        WriteRecord(save, KindPciConfig, function.SaveConfigState());
    }

    private static void WriteRecord(MemoryStream s, ushort kind, byte[] payload)
    {
        Span<byte> h = stackalloc byte[RecordHeaderSize];
        BinaryPrimitives.WriteUInt32LittleEndian(h, RecordMagic);
        BinaryPrimitives.WriteUInt16LittleEndian(h[4..], kind);
        BinaryPrimitives.WriteUInt16LittleEndian(h[6..], 0);
        BinaryPrimitives.WriteUInt32LittleEndian(h[8..], (uint)payload.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(h[12..], Crc32C.Compute(payload));
        s.Write(h);
        s.Write(payload);
    }

    public int ReadData(Span<byte> buffer)
    {
        var s = _save ?? throw new MigrationException(Errno.EINVAL, "no save session");
        int n = (int)Math.Min(buffer.Length, s.Length - _saveRead);
        s.GetBuffer().AsSpan((int)_saveRead, n).CopyTo(buffer);
        _saveRead += n;
        return n;
    }

    public void WriteData(ReadOnlySpan<byte> data)
    {
        var l = _load ?? throw new MigrationException(Errno.EINVAL, "no resume session");
        if (l.Length + data.Length > NvmeStateCodec.MaxStateBytes + 4096)
        {
            throw new MigrationException(Errno.EFBIG, "NVMe migration stream is larger than any controller state");
        }
        l.Write(data);
        ParseRecords(final: false);
    }

    /// <summary>Parses complete records; the profile is checked as soon as it arrives.</summary>
    private void ParseRecords(bool final)
    {
        var l = _load!;
        var buf = l.GetBuffer().AsSpan(0, (int)l.Length);
        int at = 0;
        while (buf.Length - at >= RecordHeaderSize)
        {
            var h = buf[at..];
            uint magic = BinaryPrimitives.ReadUInt32LittleEndian(h);
            ushort kind = BinaryPrimitives.ReadUInt16LittleEndian(h[4..]);
            uint len = BinaryPrimitives.ReadUInt32LittleEndian(h[8..]);
            if (magic != RecordMagic || kind is not (KindProfile or KindState or KindPciConfig) || len > NvmeStateCodec.MaxStateBytes)
            {
                throw new MigrationException(Errno.EINVAL, $"not an NVMe secondary controller migration stream (record magic 0x{magic:X8}, kind {kind})");
            }
            if (buf.Length - at - RecordHeaderSize < len)
            {
                break;
            }
            var payload = buf.Slice(at + RecordHeaderSize, (int)len);
            if (Crc32C.Compute(payload) != BinaryPrimitives.ReadUInt32LittleEndian(h[12..]))
            {
                throw new MigrationException(Errno.EINVAL, "NVMe migration record CRC32C mismatch");
            }
            if (kind == KindProfile)
            {
                if (!NvmeMigrationProfile.TryDecode(payload, out var source, out _))
                {
                    throw new MigrationException(Errno.EINVAL, "NVMe migration profile record is malformed");
                }
                if (primary.ProfileOf(cntlid).Difference(source) is { } diff)
                {
                    throw new MigrationException(Errno.EINVAL, $"incompatible NVMe secondary controller {cntlid}: {diff}");
                }
            }
            else if (kind == KindState)
            {
                _loadedState = payload.ToArray();
            }
            else
            {
                _loadedConfig = payload.ToArray();
            }
            at += RecordHeaderSize + (int)len;
        }
        if (at > 0)
        {
            // Keep only the unparsed tail.
            byte[] rest = buf[at..].ToArray();
            l.SetLength(0);
            l.Write(rest);
        }
        if (final && l.Length != 0)
        {
            throw new MigrationException(Errno.EINVAL, "NVMe migration stream ends inside a record");
        }
    }

    private void Commit()
    {
        if (_load is null)
        {
            throw new MigrationException(Errno.EINVAL, "no resume session");
        }
        ParseRecords(final: true);
        _load = null;
        var state = _loadedState ?? throw new MigrationException(Errno.EINVAL, "NVMe migration stream has no controller state");
        var config = _loadedConfig ?? throw new MigrationException(Errno.EINVAL, "NVMe migration stream has no PCI config state");
        _loadedState = null;
        _loadedConfig = null;
        // Config first (it validates fully before applying), then the controller; undo the config if the controller refuses.
        byte[] previousConfig = function.SaveConfigState();
        try
        {
            function.LoadConfigState(config);
        }
        catch (InvalidDataException e)
        {
            throw new MigrationException(Errno.EINVAL, $"VF PCI config state refused: {e.Message}");
        }
        var st = primary.SetControllerState(cntlid, state, out string error);
        if (!st.IsSuccess)
        {
            function.LoadConfigState(previousConfig);
            // Set Controller State validates everything before applying: the controller is unchanged.
            throw new MigrationException(Errno.EINVAL, $"Set Controller State refused ({st}): {error}");
        }
    }

    public PrecopyInfo GetPrecopyInfo()
    {
        var s = _save ?? throw new MigrationException(Errno.EINVAL, "no pre-copy session");
        return new PrecopyInfo((ulong)(s.Length - _saveRead), 0);
    }

    public ulong GetStopCopySize()
    {
        ulong pending = _save is { } s ? (ulong)(s.Length - _saveRead) : (ulong)(RecordHeaderSize + primary.ProfileOf(cntlid).EncodedSize);
        return pending + (2 * RecordHeaderSize) + (ulong)primary.EstimateStateSize(cntlid) + (ulong)function.SaveConfigState().Length;
    }

    // ---- DMA_LOGGING_* (IDmaLoggingDriver): memory-change tracking through the primary ----

    /// <summary>DMA_LOGGING_START: Track Send / Track Memory Changes / start. EBUSY if tracking already runs.</summary>
    public int Start(ulong pageSize)
    {
        if (pageSize < NvmeMigrationController.TrackPageSize || !System.Numerics.BitOperations.IsPow2(pageSize))
        {
            return Errno.EINVAL;
        }
        lock (_logGate)
        {
            if (_logGranule != 0)
            {
                return Errno.EBUSY;
            }
            var st = primary.TrackMemoryChanges(cntlid, start: true);
            if (!st.IsSuccess)
            {
                // Command Sequence Error: tracking already started (e.g. by a host agent on the PF) or no memory attached.
                return st == NvmeStatus.CommandSequenceError ? Errno.EBUSY : Errno.EIO;
            }
            _logGranule = pageSize;
            _pendingPages.Clear();
            return 0;
        }
    }

    /// <summary>DMA_LOGGING_STOP: Track Send / Track Memory Changes / stop. EINVAL if not started here.</summary>
    public int Stop()
    {
        lock (_logGate)
        {
            if (_logGranule == 0)
            {
                return Errno.EINVAL;
            }
            _logGranule = 0;
            _pendingPages.Clear();
            return primary.TrackMemoryChanges(cntlid, start: false).IsSuccess ? 0 : Errno.EIO;
        }
    }

    /// <summary>
    /// DMA_LOGGING_REPORT: Track Receive until the primary has no more runs (each run = <see cref="TrackedMemoryChange"/>:
    /// start address and 4 KiB page count), then reads and clears the pages of [iova, +length) into one bit per
    /// <paramref name="pageSize"/>. Runs outside the range stay pending for a later report.
    /// </summary>
    public int Report(ulong iova, ulong length, ulong pageSize, Span<ulong> bitmap)
    {
        lock (_logGate)
        {
            if (_logGranule == 0 || pageSize < _logGranule || !System.Numerics.BitOperations.IsPow2(pageSize) || length == 0
                || iova + length < iova || (iova & (pageSize - 1)) != 0)
            {
                return Errno.EINVAL;
            }
            ulong outBits = (length + pageSize - 1) / pageSize;
            if ((ulong)bitmap.Length * 64 < outBits)
            {
                return Errno.EINVAL;
            }
            var runs = new List<TrackedMemoryChange>();
            bool more;
            do
            {
                runs.Clear();
                if (!primary.ReceiveTrackedChanges(cntlid, TrackReceiveRuns, runs, out more).IsSuccess)
                {
                    return Errno.EIO;
                }
                foreach (var r in runs)
                {
                    ulong first = r.Saddr / NvmeMigrationController.TrackPageSize;
                    ulong end = first + r.Length;
                    for (ulong p = first; p < end;)
                    {
                        // A word of the run at a time (a run can be a whole window of 4 KiB pages).
                        int bit = (int)(p & 63);
                        int take = (int)Math.Min(64UL - (ulong)bit, end - p);
                        ulong mask = take == 64 ? ulong.MaxValue : ((1UL << take) - 1) << bit;
                        System.Runtime.InteropServices.CollectionsMarshal.GetValueRefOrAddDefault(_pendingPages, p >> 6, out _) |= mask;
                        p += (ulong)take;
                    }
                }
            }
            while (more);

            bitmap.Clear();
            const int PageShift = 12;
            int fold = System.Numerics.BitOperations.TrailingZeroCount(pageSize) - PageShift;
            ulong firstPage = iova >> PageShift;
            ulong endPage = firstPage + (outBits << fold);
            foreach (ulong key in _pendingPages.Keys.ToArray())
            {
                ulong word = _pendingPages[key];
                ulong taken = 0;
                for (ulong v = word; v != 0; v &= v - 1)
                {
                    ulong p = (key << 6) + (uint)System.Numerics.BitOperations.TrailingZeroCount(v);
                    if (p >= firstPage && p < endPage)
                    {
                        ulong bit = (p - firstPage) >> fold;
                        bitmap[(int)(bit >> 6)] |= 1UL << (int)(bit & 63);
                        taken |= 1UL << (int)(p & 63);
                    }
                }
                if (taken == word)
                {
                    _pendingPages.Remove(key);
                }
                else if (taken != 0)
                {
                    _pendingPages[key] = word & ~taken;
                }
            }
            return 0;
        }
    }

    /// <summary>The client left: its DMA space (and the primary's write log in it) is gone, so tracking ended with it.</summary>
    public void OnDetached()
    {
        lock (_logGate)
        {
            _logGranule = 0;
            _pendingPages.Clear();
        }
    }

    public void OnReset()
    {
        _save = null;
        _load = null;
        _loadedState = null;
        _loadedConfig = null;
        if (primary.IsSuspended(cntlid) == true)
        {
            primary.Resume(cntlid);
        }
        // A reset puts the migration state back to RUNNING.
        function.Controller.SetPollingAllowed(true);
    }
}
