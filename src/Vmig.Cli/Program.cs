namespace Vmig.Cli;

internal static class Program
{
    private static int Main(string[] args)
    {
        Console.Error.WriteLine("vmig: commands are being built; see README.md");
        return 2;
    }
}
