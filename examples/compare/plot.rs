//! `--plot FILE.svg`: slowdown against budget, one panel per model, one line per policy
//! (hand-written SVG; out-of-memory points are left out, breaking the line).

use super::replay::Row;
use std::fmt::Write;

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 220.0;
const COLS: usize = 3;
/// Plot area inside a panel: left, top, right, bottom margins.
const MARGIN: (f64, f64, f64, f64) = (48.0, 26.0, 20.0, 34.0);
const LEGEND_H: f64 = 30.0;
const COLORS: [&str; 8] = [
    "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#ff7f0e", "#8c564b", "#e377c2",
];

/// The SVG document for `rows`: budgets `fracs` (largest first) on a log axis, slowdown on a
/// log axis from 1 to each panel's largest.
pub fn svg(rows: &[Row], fracs: &[f64], policies: &[&str]) -> String {
    let mut models: Vec<&str> = rows.iter().map(|r| r.model).collect();
    models.dedup();
    let rows_n = models.len().div_ceil(COLS).max(1);
    let (w, h) = (PANEL_W * COLS as f64, PANEL_H * rows_n as f64 + LEGEND_H);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    for (i, p) in policies.iter().enumerate() {
        let x = 10.0 + i as f64 * 110.0;
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="15" x2="{}" y2="15" stroke="{c}" stroke-width="2"/><text x="{}" y="19">{p}</text>"#,
            x + 20.0,
            x + 25.0
        );
    }
    for (k, m) in models.iter().enumerate() {
        let ox = (k % COLS) as f64 * PANEL_W;
        let oy = LEGEND_H + (k / COLS) as f64 * PANEL_H;
        panel(&mut s, rows, m, fracs, policies, ox, oy);
    }
    s.push_str("</svg>\n");
    s
}

/// One model's panel with its top-left corner at `(ox, oy)`.
fn panel(
    s: &mut String,
    rows: &[Row],
    model: &str,
    fracs: &[f64],
    policies: &[&str],
    ox: f64,
    oy: f64,
) {
    let (l, t, r, b) = MARGIN;
    let (x0, x1, y0, y1) = (ox + l, ox + PANEL_W - r, oy + PANEL_H - b, oy + t);
    let mine: Vec<&Row> = rows.iter().filter(|r| r.model == model).collect();
    let top = mine
        .iter()
        .filter_map(|r| r.slowdown)
        .fold(1.0f64, f64::max)
        .max(1.1);
    let (fmax, fmin) = (
        fracs.first().copied().unwrap_or(1.0),
        fracs.last().copied().unwrap_or(0.125),
    );
    let span = (fmax / fmin).log2().max(1e-9);
    let px = |f: f64| x0 + (fmax / f).log2() / span * (x1 - x0);
    let py = |v: f64| y0 - v.max(1.0).ln() / top.ln() * (y0 - y1);
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#444"/><text x="{}" y="{}" text-anchor="middle" font-weight="bold">{model}</text>"##,
        x1 - x0,
        y0 - y1,
        (x0 + x1) / 2.0,
        oy + 16.0
    );
    for &f in fracs {
        let x = px(f);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}%</text>"##,
            y0 + 13.0,
            f * 100.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">budget (share of unlimited peak)</text>"#,
        (x0 + x1) / 2.0,
        y0 + 27.0
    );
    for v in ticks(top) {
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{v}x</text>"##,
            x0 - 4.0,
            y + 4.0
        );
    }
    for (i, p) in policies.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        // Consecutive budgets that ran form one polyline; an out-of-memory budget breaks it.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for &f in fracs {
            let pt = mine
                .iter()
                .find(|r| r.policy == *p && r.budget_frac == f)
                .and_then(|r| r.slowdown);
            match (pt, runs.last_mut()) {
                (Some(v), Some(run)) => run.push((px(f), py(v))),
                _ => runs.push(Vec::new()),
            }
        }
        for run in runs.iter().filter(|r| !r.is_empty()) {
            let pts: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="1.5"/>"#,
                pts.join(" ")
            );
            for (x, y) in run {
                let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{c}"/>"#);
            }
        }
    }
}

/// Y ticks: 1, 2, 5, 10... up to `top`.
fn ticks(top: f64) -> Vec<f64> {
    let mut out = vec![1.0];
    let mut decade = 1.0;
    while decade <= top {
        for m in [2.0, 5.0, 10.0] {
            let v = decade * m;
            if v <= top {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    let mid = (top * 10.0).floor() / 10.0;
    if top < 2.0 && mid > 1.0 {
        out.push(mid);
    }
    out
}
