namespace Vmig.Native;

/// <summary>Anonymous shared memory files (memfd_create(2)), the backing of guest RAM and device memory.</summary>
public static class MemFd
{
    /// <summary>Creates a memfd of <paramref name="sizeBytes"/> bytes (sparse: pages are allocated on first touch).</summary>
    /// <exception cref="NativeException">memfd_create or ftruncate failed.</exception>
    public static UnixFd Create(string name, long sizeBytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(sizeBytes);
        int fd = Libc.memfd_create(name, Libc.MFD_CLOEXEC);
        if (fd < 0)
        {
            throw NativeException.FromLastError("memfd_create");
        }
        var h = new UnixFd(fd);
        if (Libc.ftruncate(fd, sizeBytes) != 0)
        {
            var e = NativeException.FromLastError("ftruncate");
            h.Dispose();
            throw e;
        }
        return h;
    }

    /// <summary>The size in bytes of the file behind <paramref name="fd"/> (fstat st_size).</summary>
    public static long GetSize(UnixFd fd)
    {
        ArgumentNullException.ThrowIfNull(fd);
        return FileSpace.FstatInt64(fd, FileSpace.StatSizeOffset);
    }

    /// <summary>
    /// The next allocated extent of <paramref name="fd"/> at or after byte <paramref name="offset"/>:
    /// lseek(2) SEEK_DATA then SEEK_HOLE. Bytes outside every extent are holes and read as zeros (shmem, tmpfs and most
    /// file systems report holes exactly; a file system without hole support reports the whole file as one extent,
    /// which is still correct, only less useful). The file offset of <paramref name="fd"/> moves (callers here use
    /// pread/mmap, which ignore it).
    /// </summary>
    /// <returns>(start, end) of the extent in bytes, end exclusive; or null when no data follows <paramref name="offset"/> (ENXIO).</returns>
    /// <exception cref="NativeException">lseek failed otherwise.</exception>
    public static (long Start, long End)? NextDataExtent(UnixFd fd, long offset)
    {
        ArgumentNullException.ThrowIfNull(fd);
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        bool added = false;
        try
        {
            fd.DangerousAddRef(ref added);
            long start = Libc.lseek(fd.Fd, offset, Libc.SEEK_DATA);
            if (start < 0)
            {
                int errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
                return errno == Libc.ENXIO ? null : throw new NativeException("lseek(SEEK_DATA)", errno);
            }
            long end = Libc.lseek(fd.Fd, start, Libc.SEEK_HOLE);
            if (end < 0)
            {
                int errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
                // The extent was truncated away between the two calls: nothing follows.
                return errno == Libc.ENXIO ? null : throw new NativeException("lseek(SEEK_HOLE)", errno);
            }
            return (start, end);
        }
        finally
        {
            if (added)
            {
                fd.DangerousRelease();
            }
        }
    }
}
