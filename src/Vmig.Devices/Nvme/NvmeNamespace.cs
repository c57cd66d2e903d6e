using System.Buffers;
using Microsoft.Win32.SafeHandles;
using Vmig.Spec.Nvme;

namespace Vmig.Devices.Nvme;

/// <summary>
/// An NVM namespace backed by a raw image file: logical block n lives at byte n * <see cref="LbaSize"/>. The size
/// comes from the file (whole blocks only; a trailing partial block is not exposed). Thread-safe: every access is a
/// positional read or write (pread/pwrite through <see cref="RandomAccess"/>).
/// </summary>
public sealed class NvmeNamespace : IDisposable
{
    private readonly SafeFileHandle _file;

    private NvmeNamespace(uint nsid, string path, SafeFileHandle file, int lbaSize, ulong blocks)
    {
        Nsid = nsid;
        Path = path;
        _file = file;
        LbaSize = lbaSize;
        BlockCount = blocks;
        // A stable, unique-enough identity derived from the path and NSID (NGUID and EUI-64 must not be all zero).
        var h = System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes($"{System.IO.Path.GetFullPath(path)}#{nsid}"));
        Nguid = System.Buffers.Binary.BinaryPrimitives.ReadUInt128BigEndian(h);
        Eui64 = System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(h.AsSpan(16));
    }

    /// <summary>Namespace identifier (1-based).</summary>
    public uint Nsid { get; }

    /// <summary>The backing file.</summary>
    public string Path { get; }

    /// <summary>Logical block size in bytes: 512 or 4096.</summary>
    public int LbaSize { get; }

    /// <summary>NSZE: blocks in the namespace.</summary>
    public ulong BlockCount { get; }

    public UInt128 Nguid { get; }
    public ulong Eui64 { get; }

    /// <summary>Index into the LBA format table: 0 = 512 B, 1 = 4 KiB (see <see cref="LbaFormats"/>).</summary>
    public byte FormatIndex => (byte)(LbaSize == 512 ? 0 : 1);

    /// <summary>The supported LBA formats: LBAF0 512 B, LBAF1 4 KiB (no metadata).</summary>
    public static IReadOnlyList<LbaFormat> LbaFormats { get; } = [new LbaFormat(0, 9, 0), new LbaFormat(0, 12, 0)];

    /// <summary>
    /// Opens <paramref name="path"/> read-write as namespace <paramref name="nsid"/> with <paramref name="lbaSize"/>-byte blocks.
    /// </summary>
    /// <exception cref="ArgumentException">LBA size not 512/4096, NSID 0 or 0xFFFFFFFF, or a file smaller than one block.</exception>
    /// <exception cref="IOException">The file cannot be opened.</exception>
    public static NvmeNamespace Open(uint nsid, string path, int lbaSize = 512)
    {
        if (lbaSize is not (512 or 4096))
        {
            throw new ArgumentException($"LBA size {lbaSize} is not 512 or 4096", nameof(lbaSize));
        }
        if (nsid is 0 or 0xFFFFFFFF)
        {
            throw new ArgumentException($"NSID {nsid} is reserved", nameof(nsid));
        }
        var h = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        long len = RandomAccess.GetLength(h);
        if (len < lbaSize)
        {
            h.Dispose();
            throw new ArgumentException($"{path} is {len} bytes, smaller than one {lbaSize}-byte block", nameof(path));
        }
        return new NvmeNamespace(nsid, path, h, lbaSize, (ulong)len / (ulong)lbaSize);
    }

    /// <summary>True if [slba, slba + count) is inside the namespace (no overflow).</summary>
    public bool Contains(ulong slba, ulong count) => count <= BlockCount && slba <= BlockCount - count;

    /// <summary>Reads whole blocks at <paramref name="slba"/> into <paramref name="destination"/> (length a multiple of the block size).</summary>
    public void Read(ulong slba, Span<byte> destination)
    {
        long off = checked((long)slba * LbaSize);
        int done = 0;
        while (done < destination.Length)
        {
            int n = RandomAccess.Read(_file, destination[done..], off + done);
            if (n <= 0)
            {
                // Past the end of a file that shrank underneath us: the block reads as zeroes.
                destination[done..].Clear();
                return;
            }
            done += n;
        }
    }

    /// <summary>Writes whole blocks at <paramref name="slba"/>.</summary>
    public void Write(ulong slba, ReadOnlySpan<byte> source) => RandomAccess.Write(_file, source, checked((long)slba * LbaSize));

    /// <summary>Writes zeroes over <paramref name="count"/> blocks (Write Zeroes and deallocation; DLFEAT says deallocated blocks read 0).</summary>
    public void WriteZeroes(ulong slba, ulong count)
    {
        const int Chunk = 1 << 20;
        byte[] zeros = ArrayPool<byte>.Shared.Rent(Chunk);
        try
        {
            Array.Clear(zeros, 0, Chunk);
            long off = checked((long)slba * LbaSize);
            long remaining = checked((long)count * LbaSize);
            while (remaining > 0)
            {
                int n = (int)Math.Min(Chunk, remaining);
                RandomAccess.Write(_file, zeros.AsSpan(0, n), off);
                off += n;
                remaining -= n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(zeros);
        }
    }

    /// <summary>
    /// Deallocates <paramref name="count"/> blocks (Dataset Management deallocate, Write Zeroes with DEAC): punches a
    /// hole in the image when the file system can (the blocks then take no space), else writes zeroes. Either way they
    /// read as zeroes afterwards, which is what DLFEAT (read behaviour 001b) promises.
    /// </summary>
    public void Deallocate(ulong slba, ulong count)
    {
        if (!_punchUnsupported && Vmig.Native.FileSpace.TryPunchHole(_file, checked((long)slba * LbaSize), checked((long)count * LbaSize)))
        {
            return;
        }
        _punchUnsupported = true;
        WriteZeroes(slba, count);
    }

    private volatile bool _punchUnsupported;

    /// <summary>Makes written data durable (fsync), for Flush and for writes with the write cache disabled.</summary>
    public void Flush() => RandomAccess.FlushToDisk(_file);

    /// <summary>
    /// DLFEAT (Identify Namespace byte 33): bits 2:0 = 001b, a deallocated block reads as all zeroes (punched holes
    /// and the zero-writing fallback both do); bit 3 = Write Zeroes supports the Deallocate bit (DEAC).
    /// </summary>
    public const byte Dlfeat = 0x09;

    /// <summary>The Identify Namespace structure for this namespace.</summary>
    public IdentifyNamespace Identify(bool sharedByControllers) => new()
    {
        Nsze = BlockCount,
        Ncap = BlockCount,
        Nuse = BlockCount,
        Nsfeat = 1,
        Nlbaf = (byte)(LbaFormats.Count - 1),
        Flbas = FormatIndex,
        Nmic = (byte)(sharedByControllers ? 1 : 0),
        Dlfeat = Dlfeat,
        Nvmcap = (UInt128)BlockCount * (UInt128)(uint)LbaSize,
        Nguid = Nguid,
        Eui64 = Eui64,
        Lbaf = LbaFormats,
    };

    public void Dispose() => _file.Dispose();
}
