using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Vmig.Native;

/// <summary>Allocation control of regular files (fallocate(2)): deallocating byte ranges of a namespace image.</summary>
public static class FileSpace
{
    /// <summary>
    /// Deallocates [<paramref name="offset"/>, +<paramref name="length"/>) of <paramref name="file"/> with
    /// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): the range reads as zeroes afterwards (partial filesystem
    /// blocks at the edges are zeroed, whole ones freed) and the file size does not change. Returns false, changing
    /// nothing, when the file system or kernel cannot punch holes (EOPNOTSUPP, ENOSYS), so the caller writes zeroes.
    /// </summary>
    /// <exception cref="NativeException">Any other fallocate failure (EIO, EBADF, EINVAL for a negative range...).</exception>
    public static bool TryPunchHole(SafeFileHandle file, long offset, long length)
    {
        ArgumentNullException.ThrowIfNull(file);
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (length == 0)
        {
            return true;
        }
        bool added = false;
        try
        {
            file.DangerousAddRef(ref added);
            int fd = (int)file.DangerousGetHandle();
            while (Libc.fallocate(fd, Libc.FALLOC_FL_KEEP_SIZE | Libc.FALLOC_FL_PUNCH_HOLE, offset, length) != 0)
            {
                int e = Marshal.GetLastPInvokeError();
                if (e == Libc.EINTR)
                {
                    continue;
                }
                if (e is Libc.EOPNOTSUPP or Libc.ENOSYS)
                {
                    return false;
                }
                throw new NativeException("fallocate", e);
            }
            return true;
        }
        finally
        {
            if (added)
            {
                file.DangerousRelease();
            }
        }
    }

    /// <summary>Bytes the file system has allocated to <paramref name="file"/> (fstat st_blocks × 512).</summary>
    /// <exception cref="NativeException">fstat failed.</exception>
    public static long AllocatedBytes(SafeFileHandle file)
    {
        ArgumentNullException.ThrowIfNull(file);
        return FstatInt64(file, StatBlocksOffset) * 512;
    }

    /// <summary>st_size in struct stat (LP64 glibc: the same on x86-64 and the generic arm64 layout).</summary>
    internal const int StatSizeOffset = 48;

    /// <summary>st_blocks in struct stat (LP64 glibc, both layouts).</summary>
    internal const int StatBlocksOffset = 64;

    /// <summary>One 64-bit field of fstat(2)'s struct stat for the descriptor behind <paramref name="handle"/>.</summary>
    internal static unsafe long FstatInt64(SafeHandle handle, int offset)
    {
        // struct stat is 144 (x86-64) or 128 (arm64) bytes.
        byte* st = stackalloc byte[256];
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            // SAFETY: st points at 256 stack bytes, larger than struct stat on LP64; offset + 8 is inside it.
            if (Libc.fstat((int)handle.DangerousGetHandle(), st) != 0)
            {
                throw NativeException.FromLastError("fstat");
            }
            return *(long*)(st + offset);
        }
        finally
        {
            if (added)
            {
                handle.DangerousRelease();
            }
        }
    }
}

internal static partial class Libc
{
    public const int FALLOC_FL_KEEP_SIZE = 1;
    public const int FALLOC_FL_PUNCH_HOLE = 2;
    public const int ENOSYS = 38;
    public const int EOPNOTSUPP = 95;

    [LibraryImport("libc", SetLastError = true)]
    public static partial int fallocate(int fd, int mode, long offset, long len);
}
