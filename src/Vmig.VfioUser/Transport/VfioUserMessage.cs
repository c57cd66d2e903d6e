using System.Buffers;
using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Transport;

/// <summary>
/// One received message: header, payload (a pooled buffer, returned on dispose) and the fds that arrived with it.
/// Fds not taken with <see cref="TakeFd"/> are closed on dispose, so a handler that ignores them leaks nothing.
/// </summary>
public sealed class VfioUserMessage : IDisposable
{
    private byte[]? _buffer;
    private readonly List<UnixFd>? _fds;

    internal VfioUserMessage(VfioUserHeader header, byte[]? buffer, int length, List<UnixFd>? fds, bool fdsTruncated)
    {
        Header = header;
        _buffer = buffer;
        Length = length;
        _fds = fds;
        FdsTruncated = fdsTruncated;
    }

    public VfioUserHeader Header { get; }

    /// <summary>Payload length in bytes (msg_size − 16).</summary>
    public int Length { get; }

    /// <summary>The payload (after the 16-byte header).</summary>
    public ReadOnlySpan<byte> Payload => _buffer is null ? default : _buffer.AsSpan(0, Length);

    /// <summary>Number of fds received with the message.</summary>
    public int FdCount => _fds?.Count ?? 0;

    /// <summary>The peer sent more fds than the socket layer accepts (the excess was closed by the kernel).</summary>
    public bool FdsTruncated { get; }

    /// <summary>Takes ownership of fd <paramref name="index"/> (the caller must dispose it). Null if already taken.</summary>
    public UnixFd? TakeFd(int index)
    {
        if (_fds is null || (uint)index >= (uint)_fds.Count)
        {
            throw new ArgumentOutOfRangeException(nameof(index));
        }
        var fd = _fds[index];
        _fds[index] = null!;
        return fd;
    }

    public void Dispose()
    {
        var b = Interlocked.Exchange(ref _buffer, null);
        if (b is not null)
        {
            ArrayPool<byte>.Shared.Return(b);
        }
        if (_fds is not null)
        {
            foreach (var fd in _fds)
            {
                fd?.Dispose();
            }
            _fds.Clear();
        }
    }
}
