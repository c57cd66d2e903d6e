namespace Vmig.Bench;

internal static class AccelScenario
{
    public static void Run(BenchContext ctx) => throw new NotSupportedException("accelerator scenario not written yet");
}

internal static class VmScenario
{
    public static void Run(BenchContext ctx) => throw new NotSupportedException("VM scenario not written yet");
}
