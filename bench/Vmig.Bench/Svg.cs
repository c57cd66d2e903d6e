using System.Globalization;
using System.Security;
using System.Text;

namespace Vmig.Bench;

/// <summary>A line plot of one growth series as a standalone SVG (hand-written; no plotting package restores here).</summary>
public static class Svg
{
    private const int W = 640, H = 400, L = 70, R = 20, T = 40, B = 50;

    public static string FileName(GrowthSeries series)
    {
        ArgumentNullException.ThrowIfNull(series);
        var sb = new StringBuilder();
        foreach (char c in series.Name)
        {
            sb.Append(char.IsLetterOrDigit(c) ? char.ToLowerInvariant(c) : '-');
        }
        return sb.ToString().Trim('-') + ".svg";
    }

    /// <summary>Axes from 0 to the largest value (ticks at quarters), points joined in x order, each labelled with its y.</summary>
    public static string Plot(GrowthSeries series)
    {
        ArgumentNullException.ThrowIfNull(series);
        var ci = CultureInfo.InvariantCulture;
        var pts = series.Points.OrderBy(p => p.X).ToList();
        double xMax = Math.Max(1e-9, pts.Count == 0 ? 1 : pts.Max(p => p.X));
        double yMax = Math.Max(1e-9, pts.Count == 0 ? 1 : pts.Max(p => p.Y)) * 1.1;
        double X(double x) => L + ((W - L - R) * x / xMax);
        double Y(double y) => H - B - ((H - T - B) * y / yMax);
        var sb = new StringBuilder();
        sb.Append(ci, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n");
        sb.Append(ci, $"<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n");
        sb.Append(ci, $"<text x=\"{W / 2}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{SecurityElement.Escape(series.Name)}</text>\n");
        sb.Append(ci, $"<line x1=\"{L}\" y1=\"{H - B}\" x2=\"{W - R}\" y2=\"{H - B}\" stroke=\"black\"/>\n");
        sb.Append(ci, $"<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{H - B}\" stroke=\"black\"/>\n");
        for (int i = 0; i <= 4; i++)
        {
            double xv = xMax * i / 4, yv = yMax * i / 4;
            sb.Append(ci, $"<text x=\"{X(xv):F1}\" y=\"{H - B + 18}\" text-anchor=\"middle\">{xv:G4}</text>\n");
            sb.Append(ci, $"<text x=\"{L - 6}\" y=\"{Y(yv) + 4:F1}\" text-anchor=\"end\">{yv:G4}</text>\n");
            sb.Append(ci, $"<line x1=\"{L}\" y1=\"{Y(yv):F1}\" x2=\"{W - R}\" y2=\"{Y(yv):F1}\" stroke=\"#ddd\"/>\n");
        }
        sb.Append(ci, $"<text x=\"{(L + W - R) / 2}\" y=\"{H - 12}\" text-anchor=\"middle\">{SecurityElement.Escape(series.XUnit)}</text>\n");
        sb.Append(ci, $"<text x=\"16\" y=\"{(T + H - B) / 2}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {(T + H - B) / 2})\">{SecurityElement.Escape(series.YUnit)}</text>\n");
        if (pts.Count > 0)
        {
            sb.Append("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"");
            sb.AppendJoin(' ', pts.Select(p => string.Create(ci, $"{X(p.X):F1},{Y(p.Y):F1}")));
            sb.Append("\"/>\n");
            foreach (var p in pts)
            {
                sb.Append(ci, $"<circle cx=\"{X(p.X):F1}\" cy=\"{Y(p.Y):F1}\" r=\"3.5\" fill=\"#1f77b4\"/>");
                sb.Append(ci, $"<text x=\"{X(p.X):F1}\" y=\"{Y(p.Y) - 8:F1}\" text-anchor=\"middle\" font-size=\"10\">{p.Y:G4}</text>\n");
            }
        }
        sb.Append("</svg>\n");
        return sb.ToString();
    }
}
