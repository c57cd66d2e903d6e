namespace Vmig.Migration;

/// <summary>PLACEHOLDER: filled by the migration-core work (kernel next-step table).</summary>
public static class MigrationStateMachine
{
}
