using Vmig.Native;
using Vmig.VfioUser.Protocol;

namespace Vmig.VfioUser.Server;

/// <summary>
/// The eventfds a client registered with DEVICE_SET_IRQS, per IRQ index and sub-index, with mask state for
/// maskable indices. Triggering a vector writes its eventfd (vfio-user.rst "DEVICE_SET_IRQS").
/// </summary>
public sealed class IrqTable : IIrqSignaler, IDisposable
{
    private readonly IReadOnlyList<IrqDescriptor> _irqs;
    private readonly EventFd?[][] _trigger;
    private readonly bool[][] _masked;
    private readonly object _gate = new();

    public IrqTable(IReadOnlyList<IrqDescriptor> irqs)
    {
        _irqs = irqs ?? throw new ArgumentNullException(nameof(irqs));
        _trigger = new EventFd?[irqs.Count][];
        _masked = new bool[irqs.Count][];
        for (int i = 0; i < irqs.Count; i++)
        {
            _trigger[i] = new EventFd?[irqs[i].Count];
            _masked[i] = new bool[irqs[i].Count];
        }
    }

    public bool Trigger(int index, int subindex)
    {
        EventFd? e;
        lock (_gate)
        {
            if ((uint)index >= (uint)_trigger.Length || (uint)subindex >= (uint)_trigger[index].Length || _masked[index][subindex])
            {
                return false;
            }
            e = _trigger[index][subindex];
        }
        if (e is null)
        {
            return false;
        }
        try
        {
            e.Signal();
            return true;
        }
        catch (ObjectDisposedException)
        {
            return false;
        }
    }

    public bool IsConfigured(int index, int subindex)
    {
        lock (_gate)
        {
            return (uint)index < (uint)_trigger.Length && (uint)subindex < (uint)_trigger[index].Length && _trigger[index][subindex] is not null;
        }
    }

    /// <summary>
    /// Applies a DEVICE_SET_IRQS request. <paramref name="boolData"/> holds DATA_BOOL bytes; <paramref name="fds"/> the
    /// eventfds for DATA_EVENTFD (ownership passes to the table). Returns 0 or EINVAL.
    /// </summary>
    public int Apply(in IrqSetPayload req, ReadOnlySpan<byte> boolData, IReadOnlyList<UnixFd> fds)
    {
        ArgumentNullException.ThrowIfNull(fds);
        var data = req.Flags & IrqSetFlags.DataTypeMask;
        var action = req.Flags & IrqSetFlags.ActionTypeMask;
        if (((uint)req.Flags & ~(uint)(IrqSetFlags.DataTypeMask | IrqSetFlags.ActionTypeMask)) != 0
            || !IsSingleBit((uint)data) || !IsSingleBit((uint)action) || req.Index >= (uint)_irqs.Count)
        {
            return Errno.EINVAL;
        }
        var info = _irqs[(int)req.Index];
        if (info.Count == 0)
        {
            return Errno.EINVAL;
        }
        // count = start = 0 with DATA_NONE (any action in practice TRIGGER): disable every vector of the index.
        if (req.Count == 0)
        {
            if (data != IrqSetFlags.DataNone || req.Start != 0 || action != IrqSetFlags.ActionTrigger)
            {
                return Errno.EINVAL;
            }
            lock (_gate)
            {
                for (int i = 0; i < _trigger[req.Index].Length; i++)
                {
                    _trigger[req.Index][i]?.Dispose();
                    _trigger[req.Index][i] = null;
                }
            }
            return 0;
        }
        if (req.Start >= info.Count || req.Count > info.Count - req.Start)
        {
            return Errno.EINVAL;
        }
        if (data == IrqSetFlags.DataBool && boolData.Length < req.Count)
        {
            return Errno.EINVAL;
        }
        if ((action == IrqSetFlags.ActionMask || action == IrqSetFlags.ActionUnmask) && (info.Flags & IrqInfoFlags.Maskable) == 0)
        {
            return Errno.EINVAL;
        }
        if (data == IrqSetFlags.DataEventfd)
        {
            // Mask/unmask notification eventfds are not supported (no index we serve is maskable that way).
            if (action != IrqSetFlags.ActionTrigger || (fds.Count != 0 && fds.Count != req.Count))
            {
                return Errno.EINVAL;
            }
            lock (_gate)
            {
                for (int i = 0; i < req.Count; i++)
                {
                    int sub = (int)(req.Start + i);
                    _trigger[req.Index][sub]?.Dispose();
                    _trigger[req.Index][sub] = fds.Count == 0 ? null : EventFd.FromHandle(fds[i]);
                }
            }
            return 0;
        }
        if (fds.Count != 0)
        {
            return Errno.EINVAL;
        }
        for (int i = 0; i < req.Count; i++)
        {
            if (data == IrqSetFlags.DataBool && boolData[i] == 0)
            {
                continue;
            }
            int sub = (int)(req.Start + i);
            switch (action)
            {
                case IrqSetFlags.ActionMask:
                    lock (_gate)
                    {
                        _masked[req.Index][sub] = true;
                    }
                    break;
                case IrqSetFlags.ActionUnmask:
                    lock (_gate)
                    {
                        _masked[req.Index][sub] = false;
                    }
                    break;
                default:
                    Trigger((int)req.Index, sub);
                    break;
            }
        }
        return 0;
    }

    /// <summary>Closes every eventfd (client gone).</summary>
    public void Clear()
    {
        lock (_gate)
        {
            foreach (var row in _trigger)
            {
                for (int i = 0; i < row.Length; i++)
                {
                    row[i]?.Dispose();
                    row[i] = null;
                }
            }
            foreach (var row in _masked)
            {
                Array.Clear(row);
            }
        }
    }

    public void Dispose() => Clear();

    private static bool IsSingleBit(uint v) => v != 0 && (v & (v - 1)) == 0;
}
