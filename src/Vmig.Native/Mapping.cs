using System.Runtime.InteropServices;

namespace Vmig.Native;

/// <summary>
/// A MAP_SHARED mapping of a file (memfd) into this process: guest RAM in the VMM, a DMA window in a
/// device host, device memory. Accessed by offset; spans are bounds-checked against <see cref="Length"/>.
/// Unmapped exactly once, on dispose or finalization.
/// </summary>
public sealed unsafe class Mapping : SafeHandle
{
    private readonly long _length;

    private Mapping(void* addr, long length) : base(IntPtr.Zero, ownsHandle: true)
    {
        SetHandle((IntPtr)addr);
        _length = length;
    }

    public override bool IsInvalid => handle == IntPtr.Zero || handle == new IntPtr(-1);

    /// <summary>Size of the mapping in bytes.</summary>
    public long Length => _length;

    /// <summary>Maps <paramref name="length"/> bytes of <paramref name="fd"/> from <paramref name="offset"/> (page aligned).</summary>
    /// <exception cref="NativeException">mmap failed (EINVAL for bad alignment, ENOMEM, EACCES…).</exception>
    public static Mapping Map(UnixFd fd, long offset, long length, bool writable = true, bool populate = false)
    {
        ArgumentNullException.ThrowIfNull(fd);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        int prot = Libc.PROT_READ | (writable ? Libc.PROT_WRITE : 0);
        int flags = Libc.MAP_SHARED | (populate ? Libc.MAP_POPULATE : 0);
        bool added = false;
        try
        {
            fd.DangerousAddRef(ref added);
            // SAFETY: a fresh mapping chosen by the kernel; nothing aliases it yet.
            void* p = Libc.mmap(null, (nuint)length, prot, flags, fd.Fd, offset);
            if (p == (void*)-1)
            {
                throw NativeException.FromLastError("mmap");
            }
            return new Mapping(p, length);
        }
        finally
        {
            if (added)
            {
                fd.DangerousRelease();
            }
        }
    }

    /// <summary>A span over [<paramref name="offset"/>, +<paramref name="count"/>).</summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside the mapping.</exception>
    /// <remarks>The span is valid only while this mapping is alive; callers keep a reference for that long.</remarks>
    public Span<byte> GetSpan(long offset, int count)
    {
        if (offset < 0 || count < 0 || offset > _length - count)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, +{count}) is outside a mapping of {_length} bytes");
        }
        ObjectDisposedException.ThrowIf(IsClosed, this);
        // SAFETY: bounds checked above against the mapped length; the mapping lives as long as this object.
        return new Span<byte>((byte*)handle + offset, count);
    }

    /// <summary>
    /// A <see cref="Memory{T}"/> over [<paramref name="offset"/>, +<paramref name="count"/>): for gather lists
    /// (<see cref="FdSocket.SendGather"/>) and other places a span cannot be kept. Pinning it keeps the mapping alive;
    /// otherwise, as for <see cref="GetSpan"/>, it is valid only while this mapping is.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside the mapping.</exception>
    public Memory<byte> GetMemory(long offset, int count)
    {
        if (offset < 0 || count < 0 || offset > _length - count)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, +{count}) is outside a mapping of {_length} bytes");
        }
        ObjectDisposedException.ThrowIf(IsClosed, this);
        return new MappingMemory(this, offset, count).Memory;
    }

    /// <summary>True if [offset, offset+count) lies inside the mapping (no overflow).</summary>
    public bool Contains(long offset, long count) => offset >= 0 && count >= 0 && offset <= _length - count;

    /// <summary>Reads a little-endian u64 atomically (8-byte aligned offsets only).</summary>
    public long ReadInt64Volatile(long offset)
    {
        CheckAligned(offset, 8);
        // SAFETY: offset checked in range and 8-aligned, so the access is a single aligned load.
        return Volatile.Read(ref *(long*)((byte*)handle + offset));
    }

    /// <summary>Reads a u32 with acquire semantics (4-byte aligned offsets only), e.g. a shadow doorbell.</summary>
    public uint ReadUInt32Volatile(long offset)
    {
        CheckAligned(offset, 4);
        // SAFETY: offset checked in range and 4-aligned.
        return Volatile.Read(ref *(uint*)((byte*)handle + offset));
    }

    /// <summary>Writes a u32 with release semantics (4-byte aligned offsets only).</summary>
    public void WriteUInt32Volatile(long offset, uint value)
    {
        CheckAligned(offset, 4);
        // SAFETY: offset checked in range and 4-aligned.
        Volatile.Write(ref *(uint*)((byte*)handle + offset), value);
    }

    private void CheckAligned(long offset, int size)
    {
        if (!Contains(offset, size) || (offset & (size - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(offset));
        }
        ObjectDisposedException.ThrowIf(IsClosed, this);
    }

    protected override bool ReleaseHandle() => Libc.munmap((void*)handle, (nuint)_length) == 0;
}
