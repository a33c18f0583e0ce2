//! Plain string templating for the console: escaping, the page frame, tables and SVG charts.

use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
pub fn query_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A whole page: head with the console's own stylesheet and script, the navigation (when
/// signed in, with the sign-out form), a notice, and `body`.
pub fn page(title: &str, nav: Option<(&str, &str)>, notice: Option<&str>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · otm</title>\
         <link rel=\"icon\" href=\"/console/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/console/console.css\">\
         <script src=\"/console/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header><span class=\"brand\">otm</span>",
        esc(title)
    );
    if let Some((csrf, who)) = nav {
        let _ = write!(
            out,
            "<nav aria-label=\"Console\"><a href=\"/\">Fleet</a><a href=\"/charts\">Charts</a>\
             <a href=\"/audit\">Audit</a></nav>\
             <form class=\"signout\" method=\"post\" action=\"/signout\">{}\
             <span class=\"who\">{}</span><button type=\"submit\">Sign out</button></form>",
            csrf_field(csrf),
            esc(who)
        );
    }
    out.push_str("</header><main id=\"main\" tabindex=\"-1\">");
    if let Some(n) = notice {
        let _ = write!(out, "<p class=\"notice\" role=\"status\">{}</p>", esc(n));
    }
    out.push_str(body);
    out.push_str("</main></body></html>");
    out
}

/// The hidden field every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// A form of one button that posts to `action`.
pub fn button(action: &str, csrf: &str, label: &str, class: &str) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\">{}<button type=\"submit\" class=\"{}\">{}</button></form>",
        esc(action),
        csrf_field(csrf),
        esc(class),
        esc(label)
    )
}

/// "12 s ago", "3 min ago", "2 h ago", "4 d ago"; "never" for 0.
pub fn ago(now_ms: i64, at_ms: i64) -> String {
    if at_ms <= 0 {
        return "never".into();
    }
    duration(((now_ms - at_ms).max(0) / 1000) as u64) + " ago"
}

/// A duration in seconds, coarsely.
pub fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// Colours for chart series, in order.
const COLOURS: [&str; 8] = [
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f",
];

/// One line of a chart: its name and its points `(time ms, value)`; a gap where a value is
/// missing.
pub struct Series {
    pub name: String,
    pub points: Vec<(i64, Option<f64>)>,
}

/// A line chart as inline SVG over `[from_ms, to_ms]`, with its legend as a list. Presentation
/// attributes only (the content security policy allows no inline style).
pub fn chart(title: &str, unit: &str, from_ms: i64, to_ms: i64, series: &[Series]) -> String {
    const W: f64 = 600.0;
    const H: f64 = 200.0;
    const LEFT: f64 = 48.0;
    const BOTTOM: f64 = 22.0;
    const TOP: f64 = 8.0;
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let top = nice_ceiling(max);
    let span = (to_ms - from_ms).max(1) as f64;
    let x = |t: i64| LEFT + (t - from_ms) as f64 / span * (W - LEFT - 4.0);
    let y = |v: f64| TOP + (1.0 - v / top) * (H - TOP - BOTTOM);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<figure class=\"chart\"><figcaption>{} <small>({})</small></figcaption>\
         <svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"none\">",
        esc(title),
        esc(unit),
        esc(title)
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let yy = y(v);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{W}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#d4d4d8\" stroke-width=\"1\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#52525b\">{}</text>",
            LEFT - 4.0,
            yy + 4.0,
            short_number(v)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"11\" fill=\"#52525b\">−{} min</text>\
         <text x=\"{W}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\" fill=\"#52525b\">now</text>",
        H - 6.0,
        (to_ms - from_ms) / 60_000,
        H - 6.0
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut d = String::new();
        let mut pen_down = false;
        let mut dots = String::new();
        for &(t, v) in &s.points {
            match v {
                Some(v) => {
                    let _ = write!(
                        d,
                        "{}{:.1} {:.1} ",
                        if pen_down { "L" } else { "M" },
                        x(t),
                        y(v)
                    );
                    let _ = write!(
                        dots,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{colour}\"/>",
                        x(t),
                        y(v)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if !d.is_empty() {
            let _ = write!(
                svg,
                "<path d=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>{dots}",
                d.trim_end()
            );
        }
    }
    svg.push_str("</svg><ul class=\"legend\">");
    if series.is_empty() {
        svg.push_str("<li>no data yet</li>");
    }
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let last = s.points.iter().rev().find_map(|p| p.1);
        let _ = write!(
            svg,
            "<li><svg class=\"swatch\" viewBox=\"0 0 10 10\" aria-hidden=\"true\"><rect width=\"10\" height=\"10\" fill=\"{colour}\"/></svg>{} <small>{}</small></li>",
            esc(&s.name),
            last.map(|v| format!("last {}", short_number(v)))
                .unwrap_or_default()
        );
    }
    svg.push_str("</ul></figure>");
    svg
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn short_number(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_attributes_are_escaped() {
        assert_eq!(
            esc("<script>\"x\"&'y'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;"
        );
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }

    #[test]
    fn a_chart_breaks_its_line_where_values_are_missing() {
        let s = Series {
            name: "cold".into(),
            points: vec![(0, Some(1.0)), (10, None), (20, Some(2.0)), (30, Some(3.0))],
        };
        let svg = chart("wake", "ms", 0, 30, &[s]);
        assert_eq!(svg.matches('M').count(), 2, "{svg}");
        assert!(!svg.contains("style="), "no inline style: {svg}");
    }
}
