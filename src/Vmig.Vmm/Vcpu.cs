using Vmig.Guest;

namespace Vmig.Vmm;

/// <summary>
/// A vCPU: a thread that runs its guest program slice by slice. It can be paused only between slices
/// (a consistent point: all program state is in RAM and <see cref="Registers"/>), and resumed.
/// </summary>
public sealed class Vcpu : IDisposable
{
    private readonly object _gate = new();
    private readonly byte[] _registers;
    private readonly IGuestProgram _program;
    private readonly Thread _thread;
    private bool _run;
    private bool _parked = true;
    private bool _exit;
    private bool _finished;
    private long _slices;

    internal Vcpu(int index, string kind, IGuestProgram program, byte[] registers)
    {
        Index = index;
        Kind = kind;
        _program = program;
        _registers = registers;
        _thread = new Thread(Loop) { IsBackground = true, Name = $"vcpu{index}" };
        _thread.Start();
    }

    /// <summary>vCPU index.</summary>
    public int Index { get; }

    /// <summary>The guest program kind it runs.</summary>
    public string Kind { get; }

    /// <summary>Slices run so far (progress counter for tests and stats).</summary>
    public long Slices => Interlocked.Read(ref _slices);

    /// <summary>The exception that stopped the program, if any (the vCPU then idles, like a halted CPU).</summary>
    public Exception? Fault { get; private set; }

    /// <summary>True once the program returned false or faulted.</summary>
    public bool Finished => Volatile.Read(ref _finished);

    /// <summary>
    /// A copy of the register block. Consistent only while paused (<see cref="Pause"/>); while running it may
    /// be torn.
    /// </summary>
    public byte[] Registers
    {
        get
        {
            lock (_gate)
            {
                return (byte[])_registers.Clone();
            }
        }
    }

    /// <summary>Lets the thread run slices.</summary>
    public void Resume()
    {
        lock (_gate)
        {
            _run = true;
            Monitor.PulseAll(_gate);
        }
    }

    /// <summary>Asks the thread to stop after its current slice and waits until it has.</summary>
    public void Pause()
    {
        lock (_gate)
        {
            _run = false;
            while (!_parked)
            {
                Monitor.Wait(_gate);
            }
        }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            _exit = true;
            _run = false;
            Monitor.PulseAll(_gate);
        }
        if (Thread.CurrentThread != _thread)
        {
            _thread.Join();
        }
    }

    private void Loop()
    {
        while (true)
        {
            lock (_gate)
            {
                while (!_run || _finished)
                {
                    _parked = true;
                    Monitor.PulseAll(_gate);
                    if (_exit)
                    {
                        return;
                    }
                    // A finished program idles; waking every 50 ms keeps Pause/Dispose prompt without a pulse.
                    Monitor.Wait(_gate, _finished ? 50 : Timeout.Infinite);
                }
                _parked = false;
            }
            try
            {
                if (!_program.RunSlice(_registers))
                {
                    Volatile.Write(ref _finished, true);
                }
            }
#pragma warning disable CA1031 // A guest fault halts this vCPU; the VMM reports it instead of crashing the process.
            catch (Exception e)
#pragma warning restore CA1031
            {
                Fault = e;
                Volatile.Write(ref _finished, true);
            }
            Interlocked.Increment(ref _slices);
        }
    }
}
