namespace Vmig.Guest.Workloads;

/// <summary>
/// What a verify pass found. <see cref="Writes"/>/<see cref="Reads"/> are acknowledged I/Os of the workload;
/// <see cref="Verified"/> blocks read back exactly; <see cref="Lost"/> blocks hold an older generation than the
/// ledger's (an acknowledged write vanished); <see cref="Corrupt"/> blocks hold neither.
/// </summary>
public sealed record VerifierCounts(long Writes, long Reads, long Verified, long Lost, long Corrupt)
{
    /// <summary>True when nothing was lost or corrupt.</summary>
    public bool Clean => Lost == 0 && Corrupt == 0;
}
