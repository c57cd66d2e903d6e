using System.Buffers;

namespace Vmig.Native;

/// <summary>
/// A <see cref="Memory{T}"/> over [offset, +length) of a <see cref="Mapping"/>, so mapped memory (device state, a
/// memfd) can travel where a span cannot: a gather list handed to a vectored send (<see cref="FdSocket.SendGather"/>).
/// Pinning is free (the memory is not GC-managed); a pin holds a reference on the mapping so it is not unmapped while
/// a send reads it.
/// </summary>
internal sealed unsafe class MappingMemory : MemoryManager<byte>
{
    private readonly Mapping _mapping;
    private readonly long _offset;
    private readonly int _length;

    public MappingMemory(Mapping mapping, long offset, int length)
    {
        _mapping = mapping;
        _offset = offset;
        _length = length;
    }

    public override Span<byte> GetSpan() => _mapping.GetSpan(_offset, _length);

    public override MemoryHandle Pin(int elementIndex = 0)
    {
        if ((uint)elementIndex > (uint)_length)
        {
            throw new ArgumentOutOfRangeException(nameof(elementIndex));
        }
        bool added = false;
        _mapping.DangerousAddRef(ref added);
        // SAFETY: the range was checked against the mapping in Mapping.GetMemory and elementIndex ≤ length above;
        // the reference taken here keeps the mapping mapped until Unpin.
        return new MemoryHandle((byte*)_mapping.DangerousGetHandle() + _offset + elementIndex, default, this);
    }

    public override void Unpin() => _mapping.DangerousRelease();

    protected override void Dispose(bool disposing)
    {
        // The mapping belongs to its owner.
    }
}
