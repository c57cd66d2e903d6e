using Microsoft.Win32.SafeHandles;
using Vmig.Guest.Nvme;
using Vmig.Spec.Nvme;

namespace Vmig.Guest.Workloads;

/// <summary>A completed block I/O: the caller's tag and whether the device reported success.</summary>
public readonly record struct BlockCompletion(ulong Tag, bool Success);

/// <summary>
/// An asynchronous block device as guest workloads drive it: requests name a data buffer in guest RAM and a tag;
/// completions come back by tag. A migratable implementation (the NVMe driver) keeps its queues in guest RAM, so
/// requests in flight at a migration complete on the target.
/// </summary>
public interface IGuestBlockDevice
{
    /// <summary>Logical block size in bytes.</summary>
    int BlockSize { get; }

    /// <summary>Capacity in logical blocks.</summary>
    ulong BlockCount { get; }

    /// <summary>
    /// Submits a read or write of <paramref name="blocks"/> blocks at <paramref name="lba"/> with the data buffer at
    /// <paramref name="bufferGpa"/>. Returns false (nothing submitted) when the queue is full.
    /// </summary>
    bool TrySubmit(ulong tag, bool write, ulong lba, int blocks, ulong bufferGpa);

    /// <summary>Reaps completions into <paramref name="completions"/>; returns how many.</summary>
    int Poll(Span<BlockCompletion> completions);
}

/// <summary>
/// <see cref="IGuestBlockDevice"/> over the guest NVMe driver: one I/O queue, one namespace. All state is the
/// driver's (in guest RAM), so a re-attached driver on a migration target completes requests submitted here.
/// </summary>
public sealed class NvmeBlockDevice : IGuestBlockDevice
{
    private readonly NvmeDriver _driver;
    private readonly int _qid;
    private readonly uint _nsid;

    /// <param name="driver">An initialized or attached driver.</param>
    /// <param name="qid">I/O queue to use (1..IoQueueCount); one workload per queue.</param>
    /// <param name="nsid">Namespace id.</param>
    /// <param name="blockSize">LBA data size in bytes.</param>
    /// <param name="blockCount">Namespace size in LBAs (Identify Namespace NSZE).</param>
    public NvmeBlockDevice(NvmeDriver driver, int qid, uint nsid, int blockSize, ulong blockCount)
    {
        _driver = driver ?? throw new ArgumentNullException(nameof(driver));
        _qid = qid;
        _nsid = nsid;
        BlockSize = blockSize;
        BlockCount = blockCount;
    }

    /// <summary>Opens namespace <paramref name="nsid"/> with its geometry from Identify Namespace.</summary>
    public static NvmeBlockDevice Open(NvmeDriver driver, int qid, uint nsid)
    {
        ArgumentNullException.ThrowIfNull(driver);
        var id = driver.IdentifyNamespace(nsid);
        // The LBA data size of the formatted LBA format (Identify Namespace FLBAS → LBAF[n].LBADS), not a page.
        int lba = id.FormattedLbaSize;
        if (lba is < 512 or > 65536)
        {
            throw new NvmeDriverException($"namespace {nsid} reports an LBA size of {lba} bytes");
        }
        return new NvmeBlockDevice(driver, qid, nsid, lba, id.Nsze);
    }

    public int BlockSize { get; }

    public ulong BlockCount { get; }

    public bool TrySubmit(ulong tag, bool write, ulong lba, int blocks, ulong bufferGpa)
    {
        if (_driver.InFlightCommands(_qid).Count >= _driver.IoQueueEntries - 1)
        {
            return false;
        }
        var sqe = NvmeDriver.ReadWrite(write ? NvmeIoOpcode.Write : NvmeIoOpcode.Read, _nsid, lba, blocks);
        _driver.Submit(_qid, sqe, bufferGpa, blocks * BlockSize, tag);
        return true;
    }

    public int Poll(Span<BlockCompletion> completions)
    {
        int n = 0;
        while (n < completions.Length && _driver.TryTakeAnyCompletion(_qid, out var c))
        {
            completions[n++] = new BlockCompletion(c.Tag, c.Status.IsSuccess);
        }
        return n;
    }
}

/// <summary>
/// A block device stand-in backed by a real file (pread/pwrite), emulated inside the guest's own vCPU: I/O happens
/// at submit and its completion goes into a ring in guest RAM, so — like a paravirtual device whose state is all in
/// RAM — it migrates with RAM when both hosts see the same file (shared storage).
/// </summary>
/// <remarks>
/// Ring at <c>ringGpa</c>: u32 head (next to reap), u32 tail (next to fill), then capacity entries of
/// { u64 tag, u32 success, u32 0 }. One ring occupies <see cref="RingBytes"/> bytes.
/// </remarks>
public sealed class FileBlockDevice : IGuestBlockDevice, IDisposable
{
    private const int EntrySize = 16;
    private readonly SafeFileHandle _file;
    private readonly IGuestMemory _memory;
    private readonly ulong _ring;
    private readonly uint _capacity;

    /// <summary>
    /// Opens (creating if needed) <paramref name="path"/> sized to <paramref name="blockCount"/> × <paramref name="blockSize"/>,
    /// with its completion ring at <paramref name="ringGpa"/>. <paramref name="attach"/> = true continues a ring that
    /// is already in RAM (after a migration or restore) instead of emptying it.
    /// </summary>
    public FileBlockDevice(string path, IGuestMemory memory, int blockSize, ulong blockCount, ulong ringGpa, bool attach = false, uint capacity = 64)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(blockSize);
        ArgumentOutOfRangeException.ThrowIfZero(capacity);
        _memory = memory ?? throw new ArgumentNullException(nameof(memory));
        if (ringGpa % 8 != 0 || ringGpa > memory.Size || RingBytes(capacity) > memory.Size - ringGpa)
        {
            throw new ArgumentOutOfRangeException(nameof(ringGpa), "the completion ring must be 8-aligned and inside guest RAM");
        }
        _ring = ringGpa;
        _capacity = capacity;
        if (!attach)
        {
            _memory.WriteUInt64(_ring, 0);
        }
        _file = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.ReadWrite);
        if (RandomAccess.GetLength(_file) < checked((long)blockCount * blockSize))
        {
            RandomAccess.SetLength(_file, (long)blockCount * blockSize);
        }
        BlockSize = blockSize;
        BlockCount = blockCount;
    }

    /// <summary>Guest RAM bytes of a ring with <paramref name="capacity"/> entries.</summary>
    public static ulong RingBytes(uint capacity) => 8 + ((ulong)capacity * EntrySize);

    public int BlockSize { get; }

    public ulong BlockCount { get; }

    public bool TrySubmit(ulong tag, bool write, ulong lba, int blocks, ulong bufferGpa)
    {
        uint head = _memory.ReadUInt32(_ring), tail = _memory.ReadUInt32(_ring + 4);
        if (tail - head >= _capacity)
        {
            return false;
        }
        bool ok = blocks > 0 && lba < BlockCount && (ulong)blocks <= BlockCount - lba;
        if (ok)
        {
            var buf = new byte[blocks * BlockSize];
            long off = (long)lba * BlockSize;
            if (write)
            {
                _memory.Read(bufferGpa, buf);
                RandomAccess.Write(_file, buf, off);
            }
            else
            {
                ok = RandomAccess.Read(_file, buf, off) == buf.Length;
                _memory.Write(bufferGpa, buf);
            }
        }
        ulong e = _ring + 8 + ((ulong)(tail % _capacity) * EntrySize);
        _memory.WriteUInt64(e, tag);
        _memory.WriteUInt64(e + 8, ok ? 1UL : 0);
        _memory.WriteUInt32(_ring + 4, tail + 1);
        return true;
    }

    public int Poll(Span<BlockCompletion> completions)
    {
        uint head = _memory.ReadUInt32(_ring), tail = _memory.ReadUInt32(_ring + 4);
        int n = 0;
        while (n < completions.Length && head != tail)
        {
            ulong e = _ring + 8 + ((ulong)(head % _capacity) * EntrySize);
            completions[n++] = new BlockCompletion(_memory.ReadUInt64(e), _memory.ReadUInt64(e + 8) != 0);
            head++;
        }
        if (n > 0)
        {
            _memory.WriteUInt32(_ring, head);
        }
        return n;
    }

    public void Dispose() => _file.Dispose();
}
