//! Reports people read: the memory summary after a run, and the memory timeline as an SVG.

use crate::human_bytes;
use crate::manager::MemoryStats;
use crate::pool::PoolStats;
use dynn_core::{BufferId, BufferKind};
use std::fmt::Write as _;

/// Device bytes by kind after one op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimelinePoint {
    /// The op's sequence number.
    pub seq: u64,
    /// Device bytes per [`BufferKind`].
    pub by_kind: [usize; 5],
    /// The op waited for bytes (a demand fetch, an in-flight copy or a recomputation).
    pub stalled: bool,
    /// The op evicted something to make room.
    pub evicted: bool,
}

/// What the manager saw over a run.
#[derive(Debug, Clone)]
pub struct MemoryReport {
    /// The policy.
    pub policy: &'static str,
    /// Allocator statistics.
    pub pool: PoolStats,
    /// Manager counters.
    pub stats: MemoryStats,
    /// Device bytes per kind now.
    pub device_by_kind: [usize; 5],
    /// Bytes in the host tier now: offloaded buffers, and the copies fetched buffers keep
    /// until they are written.
    pub host_bytes: usize,
    /// Largest device-resident buffers now: (bytes, kind, producing op, id).
    pub top_holders: Vec<(usize, BufferKind, &'static str, BufferId)>,
    /// Device bytes over time (when recorded).
    pub timeline: Vec<TimelinePoint>,
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stats;
        let budget = if self.pool.budget == usize::MAX {
            "unlimited".to_string()
        } else {
            human_bytes(self.pool.budget)
        };
        writeln!(
            f,
            "== dynn memory report (policy {}, device budget {budget}) ==",
            self.policy
        )?;
        writeln!(
            f,
            "peak device memory   {:>12}",
            human_bytes(s.peak_device_bytes)
        )?;
        for k in BufferKind::ALL {
            writeln!(
                f,
                "  {:<18} {:>12} at peak, {:>12} now",
                k.as_str(),
                human_bytes(s.peak_by_kind[k as usize]),
                human_bytes(self.device_by_kind[k as usize])
            )?;
        }
        writeln!(
            f,
            "host tier now        {:>12}",
            human_bytes(self.host_bytes)
        )?;
        writeln!(
            f,
            "allocator            {} in use, {} reserved (peak {}), {} segments, {} allocations, fragmentation {:.1}%, {} repacks",
            human_bytes(self.pool.in_use),
            human_bytes(self.pool.reserved),
            human_bytes(self.pool.peak_reserved),
            self.pool.segments,
            self.pool.allocations,
            self.pool.fragmentation * 100.0,
            self.stats.compactions
        )?;
        writeln!(
            f,
            "traffic              {} host->device, {} device->host, {} evictions ({} without a copy), {} write-backs, {} prefetches",
            human_bytes(s.bytes_h2d as usize),
            human_bytes(s.bytes_d2h as usize),
            s.evictions,
            s.clean_evictions,
            s.write_backs,
            s.prefetches
        )?;
        writeln!(
            f,
            "stalls               {} demand fetches, {:.1} ms waiting; {} dropped, {} recomputed ({:.3} GFLOP)",
            s.demand_fetches,
            s.stall_time.as_secs_f64() * 1e3,
            s.drops,
            s.recomputes,
            s.recompute_flops as f64 / 1e9
        )?;
        writeln!(
            f,
            "host time            {:.1} ms choosing victims, {:.1} ms in copy calls ({:.1} µs per move), {:.1} ms repacking the pool",
            s.choose_time.as_secs_f64() * 1e3,
            s.copy_call_time.as_secs_f64() * 1e3,
            s.move_host_us(),
            s.compact_time.as_secs_f64() * 1e3
        )?;
        if !self.top_holders.is_empty() {
            writeln!(f, "largest resident buffers:")?;
            for (bytes, kind, op, id) in &self.top_holders {
                writeln!(
                    f,
                    "  {id:>8} {:>12} {:<16} made by {op}",
                    human_bytes(*bytes),
                    kind.as_str()
                )?;
            }
        }
        Ok(())
    }
}

const COLORS: [&str; 5] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1"];

impl MemoryReport {
    /// The memory timeline as a standalone SVG: device bytes stacked by kind over op index,
    /// the budget as a dashed line, stalls (red) and evictions (grey) marked along the bottom.
    pub fn timeline_svg(&self, title: &str) -> String {
        let (w, h, left, right, top, bottom) = (960.0, 420.0, 80.0, 170.0, 40.0, 60.0);
        let (pw, ph) = (w - left - right, h - top - bottom);
        let pts = &self.timeline;
        let n = pts.len().max(2) as f64;
        let peak = pts
            .iter()
            .map(|p| p.by_kind.iter().sum::<usize>())
            .max()
            .unwrap_or(0);
        let budget = (self.pool.budget != usize::MAX).then_some(self.pool.budget);
        let ymax = (peak.max(budget.unwrap_or(0)) as f64 * 1.1).max(1.0);
        let x = |i: usize| left + pw * i as f64 / (n - 1.0);
        let y = |v: f64| top + ph * (1.0 - v / ymax);
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="24" font-size="15">{}</text>"#,
            escape(title)
        );
        // Stacked areas, one polygon per kind.
        let mut base = vec![0.0f64; pts.len()];
        for (k, color) in COLORS.iter().enumerate() {
            let tops: Vec<f64> = pts
                .iter()
                .zip(&base)
                .map(|(p, b)| b + p.by_kind[k] as f64)
                .collect();
            if tops.iter().zip(&base).all(|(t, b)| t == b) {
                continue;
            }
            let mut path = String::new();
            for (i, t) in tops.iter().enumerate() {
                let _ = write!(
                    path,
                    "{}{:.1},{:.1} ",
                    if i == 0 { "M" } else { "L" },
                    x(i),
                    y(*t)
                );
            }
            for (i, b) in base.iter().enumerate().rev() {
                let _ = write!(path, "L{:.1},{:.1} ", x(i), y(*b));
            }
            let _ = write!(
                svg,
                r#"<path d="{path}Z" fill="{}" fill-opacity="0.8"/>"#,
                color
            );
            base = tops;
        }
        if let Some(b) = budget {
            let _ = write!(
                svg,
                r##"<line x1="{left}" x2="{}" y1="{by:.1}" y2="{by:.1}" stroke="#333" stroke-dasharray="6,4"/><text x="{}" y="{:.1}">budget {}</text>"##,
                left + pw,
                left + 6.0,
                y(b as f64) - 5.0,
                human_bytes(b),
                by = y(b as f64)
            );
        }
        for (i, p) in pts.iter().enumerate() {
            if p.evicted {
                let _ = write!(
                    svg,
                    r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="#999"/>"##,
                    x(i),
                    top + ph + 6.0,
                    top + ph + 14.0
                );
            }
            if p.stalled {
                let _ = write!(
                    svg,
                    r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="#d62728"/>"##,
                    x(i),
                    top + ph + 16.0,
                    top + ph + 24.0
                );
            }
        }
        // Axes and labels.
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{left}" y1="{top}" y2="{0}" stroke="black"/><line x1="{left}" x2="{1}" y1="{0}" y2="{0}" stroke="black"/>"##,
            top + ph,
            left + pw
        );
        for t in 0..=4 {
            let v = ymax * t as f64 / 4.0;
            let _ = write!(
                svg,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y(v) + 4.0,
                human_bytes(v as usize)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">op index ({} ops; grey ticks: evictions, red ticks: stalls)</text>"#,
            left + pw / 2.0,
            h - 14.0,
            pts.len()
        );
        for (k, kind) in BufferKind::ALL.iter().enumerate() {
            let ly = top + 16.0 + 20.0 * k as f64;
            let _ = write!(
                svg,
                r#"<rect x="{}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{}" y="{:.1}">{}</text>"#,
                left + pw + 10.0,
                ly - 10.0,
                COLORS[k],
                left + pw + 28.0,
                ly,
                kind.as_str()
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
