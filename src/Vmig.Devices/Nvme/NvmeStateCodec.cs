using Vmig.Spec;
using System.Buffers.Binary;
using Vmig.Devices.Pci;
using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>
/// What a target secondary must match before any state moves (ARCHITECTURE §3, "migratable profile"): flexible
/// resources, queue size limit and the namespaces attached (NSID, LBA size, block count).
/// </summary>
public sealed record NvmeMigrationProfile(ushort QueueResources, ushort VectorResources, ushort Mqes, IReadOnlyList<(uint Nsid, int LbaSize, ulong Blocks)> Namespaces)
{
    /// <summary>Encoded size: 16 bytes plus 16 per namespace.</summary>
    public int EncodedSize => 16 + (16 * Namespaces.Count);

    /// <summary>u16 VQ, u16 VI, u16 MQES, u16 N, u64 0, then N × {u32 NSID, u32 LBA size, u64 blocks}.</summary>
    public byte[] Encode()
    {
        byte[] b = new byte[EncodedSize];
        BinaryPrimitives.WriteUInt16LittleEndian(b, QueueResources);
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(2), VectorResources);
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(4), Mqes);
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(6), (ushort)Namespaces.Count);
        for (int i = 0; i < Namespaces.Count; i++)
        {
            var (nsid, lba, blocks) = Namespaces[i];
            BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(16 + (16 * i)), nsid);
            BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(20 + (16 * i)), (uint)lba);
            BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(24 + (16 * i)), blocks);
        }
        return b;
    }

    /// <summary>Decodes <see cref="Encode"/>'s bytes; false if truncated or with more namespaces than a subsystem has.</summary>
    public static bool TryDecode(ReadOnlySpan<byte> s, out NvmeMigrationProfile profile, out int consumed)
    {
        profile = new NvmeMigrationProfile(0, 0, 0, []);
        consumed = 0;
        if (s.Length < 16)
        {
            return false;
        }
        int n = BinaryPrimitives.ReadUInt16LittleEndian(s[6..]);
        if (n > NvmeSubsystem.MaxNamespaces || s.Length < 16 + (16 * n))
        {
            return false;
        }
        var nss = new List<(uint, int, ulong)>(n);
        for (int i = 0; i < n; i++)
        {
            nss.Add((BinaryPrimitives.ReadUInt32LittleEndian(s[(16 + (16 * i))..]), (int)BinaryPrimitives.ReadUInt32LittleEndian(s[(20 + (16 * i))..]),
                BinaryPrimitives.ReadUInt64LittleEndian(s[(24 + (16 * i))..])));
        }
        profile = new NvmeMigrationProfile(BinaryPrimitives.ReadUInt16LittleEndian(s), BinaryPrimitives.ReadUInt16LittleEndian(s[2..]),
            BinaryPrimitives.ReadUInt16LittleEndian(s[4..]), nss);
        consumed = 16 + (16 * n);
        return true;
    }

    /// <summary>Null if <paramref name="other"/> is compatible, else a message naming the first difference.</summary>
    public string? Difference(NvmeMigrationProfile other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (QueueResources != other.QueueResources)
        {
            return $"queue resources differ: source {other.QueueResources}, target {QueueResources}";
        }
        if (VectorResources != other.VectorResources)
        {
            return $"interrupt vector resources differ: source {other.VectorResources}, target {VectorResources}";
        }
        if (Mqes != other.Mqes)
        {
            return $"MQES differs: source {other.Mqes}, target {Mqes}";
        }
        if (Namespaces.Count != other.Namespaces.Count)
        {
            return $"attached namespaces differ: source [{string.Join(",", other.Namespaces.Select(n => n.Nsid))}], target [{string.Join(",", Namespaces.Select(n => n.Nsid))}]";
        }
        for (int i = 0; i < Namespaces.Count; i++)
        {
            var (a, b) = (Namespaces[i], other.Namespaces[i]);
            if (a.Nsid != b.Nsid)
            {
                return $"attached namespace {i} differs: source NSID {b.Nsid}, target NSID {a.Nsid}";
            }
            if (a.LbaSize != b.LbaSize)
            {
                return $"namespace {a.Nsid} LBA format differs: source {b.LbaSize} B, target {a.LbaSize} B";
            }
            if (a.Blocks != b.Blocks)
            {
                return $"namespace {a.Nsid} size differs: source {b.Blocks} blocks, target {a.Blocks} blocks";
            }
        }
        return null;
    }
}

/// <summary>
/// The controller state a Get Controller State returns and Set Controller State takes (reference §5.6.2):
/// <code>
/// [0, 48)             ControllerStateHeader: VER 0, CSATTR bit 0 = suspended, NVMECSS and VSS in dwords
/// [48, 48 + NVMECSS*4) NVMe controller state v0: VER 0, NIOSQ, NIOCQ, then 24-byte I/O SQ and CQ entries (padded to a dword)
/// [.., + VSS*4)       vendor part, little-endian:
///    0 u32 magic "VNVS"  4 u16 version 3  6 u16 0  8 u32 vendor length (bytes, incl. CRC)  12 u32 0
///   16 profile: u16 VQ, u16 VI, u16 MQES, u16 N, u64 0, N × {u32 NSID, u32 LBA size, u64 blocks}
///      registers: u32 CC, u32 CSTS, u32 AQA, u32 INTMS, u64 ASQ, u64 ACQ
///      admin SQ: u8 present, u64 base, u16 entries, u16 head, u16 tail
///      admin CQ: u8 present, u64 base, u16 entries, u16 head, u16 tail, u8 phase, u8 IEN, u16 vector
///      features: u16 NSQA, u16 NCQA, u8 locked, u8 VWC, u32 arbitration, u32 coalescing, u32 AEC, u32 KATO
///      async events: u8 masked types, u16 N AER CIDs, N × u16, u16 M events, M × u32 DW0
///      shadow doorbells: u64 shadow page, u64 EventIdx page
///      counters: u64 error count, u64 reads, u64 writes, u64 512-byte blocks read, written;
///      error log: u16 K, K × 64-byte entries
///      aborted SQ slots (version 3): u16 A, A × {u16 SQID, u16 slot}
///   last u32: CRC32C (Castagnoli) of every byte of the whole state before it
/// </code>
/// Commands run to completion under the controller lock, so the only commands fetched and not completed are
/// Asynchronous Event Requests; they travel as CIDs and complete on the target.
/// </summary>
public static class NvmeStateCodec
{
    public const uint VendorMagic = 0x53564E56; // "VNVS"
    public const ushort VendorVersion = 3;

    /// <summary>Largest state accepted (bounded before any allocation).</summary>
    public const int MaxStateBytes = 256 * 1024;

    public static byte[] Save(NvmeControllerState s, NvmeMigrationProfile profile)
    {
        ArgumentNullException.ThrowIfNull(s);
        ArgumentNullException.ThrowIfNull(profile);
        var sqs = s.Sqs.Where(q => q is not null && q.Qid != 0).Select(q => q!).ToList();
        var cqs = s.Cqs.Where(q => q is not null && q.Qid != 0).Select(q => q!).ToList();
        int nvmeBytes = NvmeControllerStateV0Header.Size + (sqs.Count * IoSubmissionQueueState.Size) + (cqs.Count * IoCompletionQueueState.Size);
        var w = new Writer();
        w.Skip(ControllerStateHeader.Size);
        Span<byte> e = stackalloc byte[24];
        new NvmeControllerStateV0Header(0, (ushort)sqs.Count, (ushort)cqs.Count).WriteTo(e);
        w.Bytes(e[..NvmeControllerStateV0Header.Size]);
        foreach (var q in sqs)
        {
            new IoSubmissionQueueState(q.BaseAddress, (ushort)(q.Entries - 1), q.Qid, q.Cqid, (ushort)(1 | (q.Priority << 1)), q.Head, q.Tail).WriteTo(e);
            w.Bytes(e);
        }
        foreach (var q in cqs)
        {
            new IoCompletionQueueState(q.BaseAddress, (ushort)(q.Entries - 1), q.Qid, q.Head, q.Tail,
                IoCompletionQueueState.EncodeAttrs(true, q.InterruptsEnabled, q.Phase, q.Vector)).WriteTo(e);
            w.Bytes(e);
        }
        int vendorStart = w.Length;
        w.U32(VendorMagic);
        w.U16(VendorVersion);
        w.U16(0);
        int lengthAt = w.Length;
        w.U32(0);
        w.U32(0);
        w.Bytes(profile.Encode());
        w.U32(s.Cc);
        w.U32((uint)s.Csts);
        w.U32(s.Aqa);
        w.U32(s.Intms);
        w.U64(s.Asq);
        w.U64(s.Acq);
        var asq = s.Sqs[0];
        w.U8((byte)(asq is null ? 0 : 1));
        w.U64(asq?.BaseAddress ?? 0);
        w.U16((ushort)(asq?.Entries ?? 0));
        w.U16(asq?.Head ?? 0);
        w.U16(asq?.Tail ?? 0);
        var acq = s.Cqs[0];
        w.U8((byte)(acq is null ? 0 : 1));
        w.U64(acq?.BaseAddress ?? 0);
        w.U16((ushort)(acq?.Entries ?? 0));
        w.U16(acq?.Head ?? 0);
        w.U16(acq?.Tail ?? 0);
        w.U8((byte)(acq?.Phase == true ? 1 : 0));
        w.U8((byte)(acq?.InterruptsEnabled == true ? 1 : 0));
        w.U16(acq?.Vector ?? 0);
        w.U16(s.AllocatedSqs);
        w.U16(s.AllocatedCqs);
        w.U8((byte)(s.QueueCountLocked ? 1 : 0));
        w.U8((byte)(s.VolatileWriteCacheEnabled ? 1 : 0));
        w.U32(s.Arbitration);
        w.U32(s.InterruptCoalescing);
        w.U32(s.AsyncEventConfig);
        w.U32(s.KeepAliveTimer);
        w.U32(s.PowerManagement);
        w.U16(s.OverTemperatureThreshold);
        w.U16(s.UnderTemperatureThreshold);
        w.U32(s.ErrorRecovery);
        w.U32(s.WriteAtomicityNormal);
        w.U64(s.CoalescingDisabledVectors);
        w.U8(s.MaskedEventTypes);
        w.U16((ushort)s.OutstandingAers.Count);
        foreach (ushort cid in s.OutstandingAers)
        {
            w.U16(cid);
        }
        w.U16((ushort)s.PendingEvents.Count);
        foreach (var ev in s.PendingEvents)
        {
            w.U32(ev.Dw0);
        }
        w.U64(s.ShadowDoorbellBase);
        w.U64(s.EventIdxBase);
        w.U64(s.ErrorCount);
        w.U64(s.HostReadCommands);
        w.U64(s.HostWriteCommands);
        w.U64(s.BlocksRead512);
        w.U64(s.BlocksWritten512);
        w.U16((ushort)s.ErrorLog.Count);
        Span<byte> el = stackalloc byte[ErrorInformationEntry.Size];
        foreach (var entry in s.ErrorLog)
        {
            entry.WriteTo(el);
            w.Bytes(el);
        }
        w.U16((ushort)s.AbortedSlots.Count);
        foreach (var (sqid, slot) in s.AbortedSlots)
        {
            w.U16(sqid);
            w.U16(slot);
        }
        // Pad the vendor part so that, with the CRC, it is a whole number of dwords.
        while ((w.Length - vendorStart + 4) % 4 != 0)
        {
            w.U8(0);
        }
        int vendorBytes = w.Length - vendorStart + 4;
        w.PatchU32(lengthAt, (uint)vendorBytes);
        int nvmePadded = (nvmeBytes + 3) & ~3;
        // NVMe part is naturally a dword multiple (8 + 24n); the header says sizes in dwords.
        Span<byte> hdr = stackalloc byte[ControllerStateHeader.Size];
        new ControllerStateHeader(0, (byte)(s.Suspended ? 1 : 0), (ulong)(nvmePadded / 4), (ulong)(vendorBytes / 4)).WriteTo(hdr);
        w.Patch(0, hdr);
        w.U32(Crc32C.Compute(w.Span));
        return w.ToArray();
    }

    /// <summary>
    /// Parses and validates a whole state against the target's <paramref name="expected"/> profile and limits.
    /// Never throws on hostile bytes; on failure <paramref name="error"/> says why and nothing was built.
    /// </summary>
    public static bool TryLoad(ReadOnlySpan<byte> data, NvmeMigrationProfile expected, int maxVectorIndex, out NvmeControllerState state, out string error)
    {
        ArgumentNullException.ThrowIfNull(expected);
        state = new NvmeControllerState();
        if (data.Length < ControllerStateHeader.Size + 4 || data.Length > MaxStateBytes)
        {
            error = $"state of {data.Length} bytes is outside [{ControllerStateHeader.Size + 4}, {MaxStateBytes}]";
            return false;
        }
        if (!ControllerStateHeader.TryRead(data, out var hdr) || hdr.Ver != 0)
        {
            error = "controller state header is malformed or of an unknown version";
            return false;
        }
        ulong total = ControllerStateHeader.Size + (hdr.Nvmecss * 4) + (hdr.Vss * 4);
        if (hdr.Nvmecss > MaxStateBytes || hdr.Vss > MaxStateBytes || hdr.Vss < 5 || total != (ulong)data.Length)
        {
            error = $"state sizes (NVMECSS {hdr.Nvmecss}, VSS {hdr.Vss} dwords) do not add up to its {data.Length} bytes";
            return false;
        }
        uint crc = BinaryPrimitives.ReadUInt32LittleEndian(data[^4..]);
        if (Crc32C.Compute(data[..^4]) != crc)
        {
            error = "state CRC32C mismatch: the state is corrupt";
            return false;
        }
        var nvme = data.Slice(ControllerStateHeader.Size, (int)hdr.Nvmecss * 4);
        var r = new Reader(data.Slice(ControllerStateHeader.Size + nvme.Length, (int)hdr.Vss * 4 - 4));
        if (!NvmeControllerStateV0Header.TryRead(nvme, out var nh) || nh.Ver != 0 || nh.TotalSize > nvme.Length)
        {
            error = "NVMe controller state part is malformed";
            return false;
        }
        if (!(r.U32(out uint magic) && r.U16(out ushort ver) && r.U16(out _) && r.U32(out uint vlen) && r.U32(out _)))
        {
            error = "vendor state is truncated";
            return false;
        }
        if (magic != VendorMagic || ver != VendorVersion)
        {
            error = $"vendor state magic 0x{magic:X8} / version {ver} is foreign (want 0x{VendorMagic:X8} / {VendorVersion})";
            return false;
        }
        if (vlen != hdr.Vss * 4)
        {
            error = "vendor state length disagrees with the header";
            return false;
        }
        if (!NvmeMigrationProfile.TryDecode(r.Rest, out var source, out int used) || !r.Bytes(used, out _))
        {
            error = "vendor state profile is truncated or malformed";
            return false;
        }
        ushort vq = source.QueueResources;
        ushort mqes = source.Mqes;
        if (expected.Difference(source) is { } diff)
        {
            error = $"incompatible target: {diff}";
            return false;
        }
        var s = state;
        bool ok = r.U32(out uint cc) & r.U32(out uint csts) & r.U32(out uint aqa) & r.U32(out uint intms) & r.U64(out ulong asqReg) & r.U64(out ulong acqReg)
            & r.U8(out byte sqPresent) & r.U64(out ulong sqBase) & r.U16(out ushort sqEntries) & r.U16(out ushort sqHead) & r.U16(out ushort sqTail)
            & r.U8(out byte cqPresent) & r.U64(out ulong cqBase) & r.U16(out ushort cqEntries) & r.U16(out ushort cqHead) & r.U16(out ushort cqTail)
            & r.U8(out byte cqPhase) & r.U8(out byte cqIen) & r.U16(out ushort cqVector)
            & r.U16(out ushort nsqa) & r.U16(out ushort ncqa) & r.U8(out byte locked) & r.U8(out byte vwc)
            & r.U32(out uint arb) & r.U32(out uint coal) & r.U32(out uint aec) & r.U32(out uint kato)
            & r.U32(out uint pm) & r.U16(out ushort overTemp) & r.U16(out ushort underTemp) & r.U32(out uint errRec) & r.U32(out uint wan) & r.U64(out ulong cdVectors)
            & r.U8(out byte masked)
            & r.U16(out ushort naers);
        if (!ok || naers > NvmeController.Aerl + 1)
        {
            error = "vendor state registers/features are truncated or hold too many AERs";
            return false;
        }
        for (int i = 0; i < naers; i++)
        {
            if (!r.U16(out ushort cid))
            {
                error = "vendor state AER list is truncated";
                return false;
            }
            s.OutstandingAers.Add(cid);
        }
        if (!r.U16(out ushort nev) || nev > 64)
        {
            error = "vendor state event list is malformed";
            return false;
        }
        for (int i = 0; i < nev; i++)
        {
            if (!r.U32(out uint dw0))
            {
                error = "vendor state event list is truncated";
                return false;
            }
            s.PendingEvents.Add(AsyncEvent.FromDw0(dw0));
        }
        ok = r.U64(out ulong dbs) & r.U64(out ulong eis) & r.U64(out ulong errCount) & r.U64(out ulong hr) & r.U64(out ulong hw)
            & r.U64(out ulong br) & r.U64(out ulong bw) & r.U16(out ushort nerr);
        if (!ok || nerr > NvmeControllerState.ErrorLogDepth)
        {
            error = "vendor state counters or error log are malformed";
            return false;
        }
        for (int i = 0; i < nerr; i++)
        {
            if (!r.Bytes(ErrorInformationEntry.Size, out var raw) || !ErrorInformationEntry.TryRead(raw, out var entry))
            {
                error = "vendor state error log is truncated";
                return false;
            }
            s.ErrorLog.Add(entry);
        }
        if (!r.U16(out ushort naborted) || naborted > NvmeControllerState.MaxAbortedSlots)
        {
            error = "vendor state aborted-slot list is malformed";
            return false;
        }
        for (int i = 0; i < naborted; i++)
        {
            if (!(r.U16(out ushort sqid) & r.U16(out ushort slot)))
            {
                error = "vendor state aborted-slot list is truncated";
                return false;
            }
            s.AbortedSlots.Add((sqid, slot));
        }
        int maxEntries = mqes + 1;
        s.Cc = cc;
        s.Csts = (ControllerStatus)csts;
        s.Aqa = aqa;
        s.Intms = intms;
        s.Asq = asqReg;
        s.Acq = acqReg;
        if (sqPresent != 0)
        {
            if (cqPresent == 0 || sqEntries < 2 || sqEntries > 4096 || sqHead >= sqEntries || sqTail >= sqEntries)
            {
                error = "admin submission queue state is invalid";
                return false;
            }
            s.Sqs[0] = new SubmissionQueueState { Qid = 0, BaseAddress = sqBase, Entries = sqEntries, Head = sqHead, Tail = sqTail };
        }
        if (cqPresent != 0)
        {
            if (sqPresent == 0 || cqEntries < 2 || cqEntries > 4096 || cqHead >= cqEntries || cqTail >= cqEntries)
            {
                error = "admin completion queue state is invalid";
                return false;
            }
            s.Cqs[0] = new CompletionQueueState { Qid = 0, BaseAddress = cqBase, Entries = cqEntries, Head = cqHead, Tail = cqTail, Phase = cqPhase != 0, InterruptsEnabled = cqIen != 0, Vector = cqVector };
        }
        if (nh.Niosq > vq || nh.Niocq > vq)
        {
            error = $"state has {nh.Niosq} I/O SQs / {nh.Niocq} I/O CQs, more than {vq} queue resources";
            return false;
        }
        for (int i = 0; i < nh.Niocq; i++)
        {
            IoCompletionQueueState.TryRead(nvme[(NvmeControllerStateV0Header.Size + (nh.Niosq * IoSubmissionQueueState.Size) + (i * IoCompletionQueueState.Size))..], out var q);
            int entries = q.Qsize + 1;
            if (q.Qid == 0 || q.Qid > NvmeControllerState.MaxQueueId || s.Cqs[q.Qid] is not null || entries < 2 || entries > maxEntries
                || q.Head >= entries || q.Tail >= entries || (q.Ien && q.Iv > maxVectorIndex) || (q.Prp1 & 0xFFF) != 0)
            {
                error = $"I/O completion queue entry {i} (qid {q.Qid}) is invalid";
                return false;
            }
            s.Cqs[q.Qid] = new CompletionQueueState { Qid = q.Qid, BaseAddress = q.Prp1, Entries = entries, Head = q.Head, Tail = q.Tail, Phase = q.Phase, InterruptsEnabled = q.Ien, Vector = q.Iv };
        }
        for (int i = 0; i < nh.Niosq; i++)
        {
            IoSubmissionQueueState.TryRead(nvme[(NvmeControllerStateV0Header.Size + (i * IoSubmissionQueueState.Size))..], out var q);
            int entries = q.Qsize + 1;
            if (q.Qid == 0 || q.Qid > NvmeControllerState.MaxQueueId || s.Sqs[q.Qid] is not null || entries < 2 || entries > maxEntries
                || q.Head >= entries || q.Tail >= entries || q.Cqid == 0 || q.Cqid > NvmeControllerState.MaxQueueId || s.Cqs[q.Cqid] is null || (q.Prp1 & 0xFFF) != 0)
            {
                error = $"I/O submission queue entry {i} (qid {q.Qid}) is invalid";
                return false;
            }
            s.Sqs[q.Qid] = new SubmissionQueueState { Qid = q.Qid, BaseAddress = q.Prp1, Entries = entries, Cqid = q.Cqid, Head = q.Head, Tail = q.Tail, Priority = (byte)((q.Attrs >> 1) & 3) };
        }
        foreach (var (sqid, slot) in s.AbortedSlots)
        {
            if (sqid > NvmeControllerState.MaxQueueId || s.Sqs[sqid] is not { } asq || slot >= asq.Entries)
            {
                error = $"aborted slot {slot} of SQ {sqid} names no submission queue entry";
                return false;
            }
        }
        s.AllocatedSqs = nsqa;
        s.AllocatedCqs = ncqa;
        s.QueueCountLocked = locked != 0;
        s.VolatileWriteCacheEnabled = vwc != 0;
        s.Arbitration = arb;
        s.InterruptCoalescing = coal;
        s.AsyncEventConfig = aec;
        s.KeepAliveTimer = kato;
        s.PowerManagement = pm;
        s.OverTemperatureThreshold = overTemp;
        s.UnderTemperatureThreshold = underTemp;
        s.ErrorRecovery = errRec;
        s.WriteAtomicityNormal = wan;
        s.CoalescingDisabledVectors = cdVectors;
        s.MaskedEventTypes = masked;
        s.ShadowDoorbellBase = dbs;
        s.EventIdxBase = eis;
        s.ErrorCount = errCount;
        s.HostReadCommands = hr;
        s.HostWriteCommands = hw;
        s.BlocksRead512 = br;
        s.BlocksWritten512 = bw;
        s.Suspended = hdr.Suspended;
        error = "";
        return true;
    }

    private sealed class Writer
    {
        private byte[] _buf = new byte[1024];
        public int Length { get; private set; }
        public ReadOnlySpan<byte> Span => _buf.AsSpan(0, Length);

        private Span<byte> Grow(int n)
        {
            if (Length + n > _buf.Length)
            {
                Array.Resize(ref _buf, Math.Max(_buf.Length * 2, Length + n));
            }
            var s = _buf.AsSpan(Length, n);
            Length += n;
            return s;
        }

        public void Skip(int n) => Grow(n).Clear();
        public void Bytes(ReadOnlySpan<byte> b) => b.CopyTo(Grow(b.Length));
        public void U8(byte v) => Grow(1)[0] = v;
        public void U16(ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(Grow(2), v);
        public void U32(uint v) => BinaryPrimitives.WriteUInt32LittleEndian(Grow(4), v);
        public void U64(ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(Grow(8), v);
        public void PatchU32(int at, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(_buf.AsSpan(at), v);
        public void Patch(int at, ReadOnlySpan<byte> b) => b.CopyTo(_buf.AsSpan(at));
        public byte[] ToArray() => _buf.AsSpan(0, Length).ToArray();
    }

    private ref struct Reader(ReadOnlySpan<byte> data)
    {
        private readonly ReadOnlySpan<byte> _d = data;
        private int _p;

        public readonly ReadOnlySpan<byte> Rest => _d[_p..];

        public bool U8(out byte v)
        {
            v = 0;
            if (_p + 1 > _d.Length)
            {
                return false;
            }
            v = _d[_p++];
            return true;
        }

        public bool U16(out ushort v)
        {
            v = 0;
            if (_p + 2 > _d.Length)
            {
                return false;
            }
            v = BinaryPrimitives.ReadUInt16LittleEndian(_d[_p..]);
            _p += 2;
            return true;
        }

        public bool U32(out uint v)
        {
            v = 0;
            if (_p + 4 > _d.Length)
            {
                return false;
            }
            v = BinaryPrimitives.ReadUInt32LittleEndian(_d[_p..]);
            _p += 4;
            return true;
        }

        public bool U64(out ulong v)
        {
            v = 0;
            if (_p + 8 > _d.Length)
            {
                return false;
            }
            v = BinaryPrimitives.ReadUInt64LittleEndian(_d[_p..]);
            _p += 8;
            return true;
        }

        public bool Bytes(int n, out ReadOnlySpan<byte> v)
        {
            v = default;
            if (_p + n > _d.Length)
            {
                return false;
            }
            v = _d.Slice(_p, n);
            _p += n;
            return true;
        }
    }
}
