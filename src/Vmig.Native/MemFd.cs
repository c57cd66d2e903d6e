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
}
