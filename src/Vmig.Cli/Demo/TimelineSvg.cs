using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;

namespace Vmig.Cli.Demo;

/// <summary>
/// Writes an SVG timeline of each migration, by hand (no plotting package restores here): phase bands, bytes sent
/// (blue), RAM dirty rate (orange), and the downtime window (red) from the switchover to the target resuming.
/// </summary>
internal static class TimelineSvg
{
    private const int Width = 900, PanelHeight = 230, Left = 70, Right = 70, Top = 30, PlotHeight = 150;

    public static void Write(string path, IReadOnlyList<DemoMigration> migrations)
    {
        var sb = new StringBuilder();
        int height = (PanelHeight * Math.Max(1, migrations.Count)) + 20;
        sb.Append(CultureInfo.InvariantCulture, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{Width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n");
        sb.Append("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
        for (int i = 0; i < migrations.Count; i++)
        {
            Panel(sb, migrations[i], i * PanelHeight);
        }
        sb.Append("</svg>\n");
        File.WriteAllText(path, sb.ToString());
    }

    private static void Panel(StringBuilder sb, DemoMigration m, int y0)
    {
        var ev = m.Events.Where(e => e["t"] is not null).ToList();
        int plotW = Width - Left - Right;
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left}\" y=\"{y0 + 18}\" font-size=\"13\" font-weight=\"bold\">migration {m.Index}: {m.From} → {m.To} — {m.Outcome}, total {m.TotalMs:F0} ms, downtime {m.DowntimeMs:F1} ms, {DemoRunner.Mb(m.Bytes)}, {m.Rounds} rounds</text>\n");
        int top = y0 + Top;
        sb.Append(CultureInfo.InvariantCulture, $"<rect x=\"{Left}\" y=\"{top}\" width=\"{plotW}\" height=\"{PlotHeight}\" fill=\"none\" stroke=\"#999\"/>\n");
        if (ev.Count < 2)
        {
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left + 10}\" y=\"{top + 20}\">too few progress samples to plot</text>\n");
            return;
        }
        double t0 = ev[0]["t"]!.GetValue<double>();
        double t1 = Math.Max(t0 + 1, ev[^1]["t"]!.GetValue<double>());
        double maxBytes = Math.Max(1, ev.Max(e => e["bytesSent"]!.GetValue<double>()));
        double maxRate = Math.Max(1, ev.Max(e => e["dirtyRate"]!.GetValue<double>()));
        double X(double t) => Left + ((t - t0) / (t1 - t0) * plotW);
        // Phase bands.
        for (int i = 0; i < ev.Count; i++)
        {
            string phase = ev[i]["phase"]!.GetValue<string>();
            double a = X(ev[i]["t"]!.GetValue<double>());
            double b = i + 1 < ev.Count ? X(ev[i + 1]["t"]!.GetValue<double>()) : Left + plotW;
            string color = phase switch
            {
                "PreCopy" => "#e8f5e9",
                "Switchover" or "StopCopy" or "WaitingForTarget" => "#ffcdd2",
                "Handshake" => "#e3f2fd",
                _ => "#f5f5f5",
            };
            sb.Append(CultureInfo.InvariantCulture, $"<rect x=\"{a:F1}\" y=\"{top}\" width=\"{Math.Max(0.5, b - a):F1}\" height=\"{PlotHeight}\" fill=\"{color}\"><title>{WebUtility.HtmlEncode(phase)}</title></rect>\n");
        }
        // Downtime window: the report's measured downtime, ending at the last sample (target resumed).
        double dEnd = X(t1);
        double dStart = X(Math.Max(t0, t1 - m.DowntimeMs));
        sb.Append(CultureInfo.InvariantCulture, $"<rect x=\"{dStart:F1}\" y=\"{top}\" width=\"{Math.Max(1.5, dEnd - dStart):F1}\" height=\"{PlotHeight}\" fill=\"#e53935\" opacity=\"0.6\"><title>downtime {m.DowntimeMs:F1} ms</title></rect>\n");
        Line(sb, ev, X, e => e["bytesSent"]!.GetValue<double>() / maxBytes, top, "#1e88e5");
        Line(sb, ev, X, e => e["dirtyRate"]!.GetValue<double>() / maxRate, top, "#fb8c00");
        int by = top + PlotHeight;
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left}\" y=\"{by + 14}\">0 ms</text><text x=\"{Left + plotW}\" y=\"{by + 14}\" text-anchor=\"end\">{t1 - t0:F0} ms</text>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left - 5}\" y=\"{top + 10}\" text-anchor=\"end\" fill=\"#1e88e5\">{maxBytes / 1048576:F0} MiB</text>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left + plotW + 5}\" y=\"{top + 10}\" fill=\"#fb8c00\">{maxRate / 1048576:F0} MiB/s</text>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left}\" y=\"{by + 30}\"><tspan fill=\"#1e88e5\">■ bytes sent</tspan>  <tspan fill=\"#fb8c00\">■ RAM dirty rate</tspan>  <tspan fill=\"#43a047\">■ pre-copy</tspan>  <tspan fill=\"#e53935\">■ downtime window</tspan></text>\n");
    }

    private static void Line(StringBuilder sb, List<JsonObject> ev, Func<double, double> x, Func<JsonObject, double> frac, int top, string color)
    {
        sb.Append(CultureInfo.InvariantCulture, $"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\" points=\"");
        foreach (var e in ev)
        {
            sb.Append(CultureInfo.InvariantCulture, $"{x(e["t"]!.GetValue<double>()):F1},{top + PlotHeight - (frac(e) * (PlotHeight - 4)):F1} ");
        }
        sb.Append("\"/>\n");
    }
}
