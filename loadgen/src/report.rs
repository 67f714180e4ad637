//! The final report: text for people, JSON for scripts, an HdrHistogram
//! percentile file (`.hgrm`) and an SVG percentile plot.
//!
//! Runs once, after the load: free to allocate and format.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;

use hdrhistogram::Histogram;

use crate::driver::Results;
use crate::pairs::Wrong;
use crate::sched::Load;

/// The quantiles the report lists, with their names.
pub const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p99.99", 0.9999),
];

/// The JSON key of each of [`QUANTILES`].
const JSON_KEYS: [&str; 5] = ["p50", "p90", "p99", "p999", "p9999"];

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

impl Results {
    /// Pairs completed per second during the measured window.
    pub fn pairs_per_sec(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.window_completed as f64 / secs
        } else {
            0.0
        }
    }

    /// Offered pairs per second: the schedule's rate (open loop only).
    pub fn offered_per_sec(&self) -> Option<f64> {
        match self.load {
            Load::Rate(rate) => Some(rate),
            Load::Window(_) => None,
        }
    }

    /// Our CPU time in the window per pair completed in it, in microseconds.
    pub fn cpu_us_per_pair(&self) -> Option<f64> {
        (self.window_completed > 0)
            .then(|| self.cpu.as_secs_f64() * 1e6 / self.window_completed as f64)
    }

    /// True when a reply failed a check: the run fails.
    pub fn any_wrong(&self) -> bool {
        self.wrong.total() > 0
    }
}

/// The human report, for stdout.
pub fn text(r: &Results, server: SocketAddr) -> String {
    let mut s = String::new();
    let model = match r.load {
        Load::Rate(rate) => format!("open loop at {rate} pairs/s"),
        Load::Window(w) => format!("closed loop, window {w}"),
    };
    let _ = writeln!(
        s,
        "psync-loadgen: {server}, {model}, {} sockets, {:.1} s measured",
        r.sockets,
        r.window.as_secs_f64()
    );
    match r.offered_per_sec() {
        Some(o) => {
            let _ = writeln!(
                s,
                "offered    {o:12.0} pairs/s ({} pairs scheduled)",
                r.scheduled.unwrap_or(0)
            );
        }
        None => {
            let _ = writeln!(s, "offered             max pairs/s (closed loop)");
        }
    }
    let _ = writeln!(s, "achieved   {:12.0} pairs/s", r.pairs_per_sec());
    let m = &r.measured;
    let _ = writeln!(s, "completed  {:12}", m.completed);
    let _ = writeln!(s, "lost       {:12}", m.lost);
    let _ = writeln!(s, "wrong      {:12}", r.wrong.total());
    let _ = writeln!(s, "late       {:12}", m.late);
    if m.replayed + m.replay_missing > 0 {
        let _ = writeln!(
            s,
            "replays    {:12} received for retransmits ({} missing)",
            m.replayed, m.replay_missing
        );
    }
    if r.bad_sent > 0 {
        let _ = writeln!(
            s,
            "malformed  {:12} sent (the server must not answer them)",
            r.bad_sent
        );
    }
    if r.pending_sent > 0 {
        let _ = writeln!(
            s,
            "preloaded  {:12} one-sided registrations",
            r.pending_sent
        );
    }
    let h = &r.histogram;
    let _ = writeln!(
        s,
        "pair-completion latency, from the scheduled send of the second request (us):"
    );
    if h.is_empty() {
        let _ = writeln!(s, "  (no pair scheduled in the measured window completed)");
    } else {
        for (name, q) in QUANTILES {
            let _ = writeln!(s, "  {name:7} {:10.1}", us(h.value_at_quantile(q)));
        }
        let _ = writeln!(s, "  {:7} {:10.1}", "max", us(h.max()));
    }
    if let Some(cpu) = r.cpu_us_per_pair() {
        let _ = writeln!(s, "loadgen CPU {cpu:.2} us per completed pair");
    }
    for w in Wrong::ALL {
        let n = r.wrong.get(w);
        if n > 0 {
            let _ = writeln!(s, "  wrong {}: {n}", w.name());
        }
    }
    if let Some(f) = &r.first_wrong {
        let _ = write!(
            s,
            "first wrong reply ({}) at {}, {} bytes:",
            f.kind.name(),
            f.at,
            f.len
        );
        for b in &f.bytes[..f.len.min(f.bytes.len())] {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    for line in warnings(r) {
        let _ = writeln!(s, "warning: {line}");
    }
    s
}

/// Things that make the numbers less than they seem.
fn warnings(r: &Results) -> Vec<String> {
    let mut w = Vec::new();
    if r.all.issued > 0 && r.all.completed == 0 && r.wrong.total() == 0 {
        // The rest (unsent pairs, busy socket pairs) would only follow from it.
        w.push("no pair completed: is the server running at that address and family?".into());
        return w;
    }
    if r.warmup_skipped > 0 {
        w.push(format!(
            "the warmup fell {} pairs behind its schedule (dropped, not measured): \
             the offered rate is above what the server (or this machine) sustains",
            r.warmup_skipped
        ));
    }
    if r.unsent > 0 {
        w.push(format!(
            "{} scheduled pairs were never sent: every socket pair stayed busy until the \
             window ended (the server is slower than the offered rate, or raise --sockets)",
            r.unsent
        ));
    } else if r.slot_waits > 0 && matches!(r.load, Load::Rate(_)) {
        w.push(format!(
            "{} pairs waited for a free socket pair; their wait is in the latency (raise --sockets)",
            r.slot_waits
        ));
    }
    if r.send_failed > 0 {
        w.push(format!("{} datagrams could not be sent", r.send_failed));
    }
    if r.stray > 0 {
        w.push(format!(
            "{} datagrams came from a port other than the server's and were ignored",
            r.stray
        ));
    }
    if r.wrong.get(Wrong::NotOurs) > 0 {
        w.push(
            "replies named partners that are not our sockets' addresses: if a NAT sits \
             between the load generator and the server, run them without it"
                .into(),
        );
    }
    w
}

fn json_f64(s: &mut String, v: f64) {
    if v.is_finite() {
        let _ = write!(s, "{v:.3}");
    } else {
        s.push_str("null");
    }
}

/// One JSON object with the report's numbers.
pub fn json(r: &Results, server: SocketAddr) -> String {
    let m = &r.measured;
    let mut s = String::from("{");
    let _ = write!(s, "\"server\":\"{server}\",");
    match r.load {
        Load::Rate(rate) => {
            let _ = write!(s, "\"mode\":\"open\",\"rate\":{rate},");
        }
        Load::Window(w) => {
            let _ = write!(s, "\"mode\":\"closed\",\"window\":{w},");
        }
    }
    let _ = write!(s, "\"sockets\":{},\"duration_s\":", r.sockets);
    json_f64(&mut s, r.window.as_secs_f64());
    s.push_str(",\"offered_pairs_per_sec\":");
    match r.offered_per_sec() {
        Some(o) => json_f64(&mut s, o),
        None => s.push_str("null"),
    }
    s.push_str(",\"pairs_per_sec\":");
    json_f64(&mut s, r.pairs_per_sec());
    let _ = write!(
        s,
        ",\"issued\":{},\"completed\":{},\"lost\":{},\"wrong\":{},\"late\":{},\
         \"replayed\":{},\"replay_missing\":{},\"unsent\":{},\"bad_sent\":{},\
         \"pending_sent\":{},\"stray\":{},\"send_failed\":{},\"warmup_skipped\":{},\
         \"window_completed\":{}",
        m.issued,
        m.completed,
        m.lost,
        r.wrong.total(),
        m.late,
        m.replayed,
        m.replay_missing,
        r.unsent,
        r.bad_sent,
        r.pending_sent,
        r.stray,
        r.send_failed,
        r.warmup_skipped,
        r.window_completed
    );
    s.push_str(",\"wrong_by_kind\":{");
    for (k, w) in Wrong::ALL.iter().enumerate() {
        let _ = write!(
            s,
            "{}\"{}\":{}",
            if k > 0 { "," } else { "" },
            w.name(),
            r.wrong.get(*w)
        );
    }
    s.push_str("},\"latency_us\":{");
    let h = &r.histogram;
    for (k, (_, q)) in QUANTILES.iter().enumerate() {
        let _ = write!(s, "\"{}\":", JSON_KEYS[k]);
        if h.is_empty() {
            s.push_str("null");
        } else {
            json_f64(&mut s, us(h.value_at_quantile(*q)));
        }
        s.push(',');
    }
    s.push_str("\"max\":");
    if h.is_empty() {
        s.push_str("null");
    } else {
        json_f64(&mut s, us(h.max()));
    }
    s.push_str("},\"loadgen_cpu_us_per_pair\":");
    match r.cpu_us_per_pair() {
        Some(c) => json_f64(&mut s, c),
        None => s.push_str("null"),
    }
    // Whole-run totals, to compare with the server's CPU over its lifetime.
    let _ = write!(
        s,
        ",\"completed_total\":{},\"loadgen_cpu_s_total\":",
        r.all.completed
    );
    json_f64(&mut s, r.cpu_total.as_secs_f64());
    s.push('}');
    s
}

/// Writes the percentile distribution in HdrHistogram's text format
/// (values in milliseconds, as the HdrHistogram plotter expects).
pub fn write_hgrm(h: &Histogram<u64>, out: &mut dyn Write) -> io::Result<()> {
    const TO_MS: f64 = 1e6;
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / TO_MS;
        if q < 1.0 {
            writeln!(
                out,
                "{value:12.3} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            )?;
        } else {
            writeln!(out, "{value:12.3} {q:2.12} {total:10}")?;
        }
    }
    writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / TO_MS,
        h.stdev() / TO_MS
    )?;
    writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / TO_MS,
        h.len()
    )?;
    // HdrHistogram's sub-bucket count: the power of two that resolves
    // 2 * 10^sigfig distinct values (2048 for 3 significant digits).
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    )?;
    Ok(())
}

/// Writes the `.hgrm` file.
pub fn save_hgrm(h: &Histogram<u64>, path: &Path) -> io::Result<()> {
    let mut f = io::BufWriter::new(std::fs::File::create(path)?);
    write_hgrm(h, &mut f)?;
    f.flush()
}

/// The percentile a position on the plot's x axis stands for: x = 1 is 90%,
/// 2 is 99%, 3 is 99.9%, the usual "nines" scale.
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.ceil() as usize).saturating_sub(2).min(8);
    format!("{p:.digits$}%")
}

/// Draws latency against percentile (on the nines scale) as an SVG file.
pub fn save_plot(h: &Histogram<u64>, path: &Path, title: &str) -> Result<(), String> {
    use plotters::prelude::*;

    if h.is_empty() {
        return Err("no completed pair to plot".into());
    }
    // Stop the x axis where the data runs out: with n samples, the highest
    // percentile resolved is about 1 - 1/n.
    let x_max = (h.len() as f64).log10().max(1.0);
    let mut points = Vec::new();
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let x = if q < 1.0 {
            (-(1.0 - q).log10()).min(x_max)
        } else {
            x_max
        };
        points.push((x, us(v.value_iterated_to())));
    }
    let y_max = us(h.max()) * 1.1;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());

    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("pair-completion latency (us)")
        .x_labels((x_max.ceil() as usize + 1).max(2))
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_has_the_standard_shape() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap(); // 1 us .. 1 ms
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].trim_start().starts_with("Value"));
        assert_eq!(lines[1], "");
        let first: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(first.len(), 4);
        assert_eq!(first[0], "0.001");
        let last_data = lines.iter().rev().find(|l| !l.starts_with('#')).unwrap();
        let cols: Vec<&str> = last_data.split_whitespace().collect();
        assert_eq!(cols[1], "1.000000000000");
        assert_eq!(cols[2], "1000");
        assert!(text.contains("Total count    =         1000"));
        assert!(text.contains("SubBuckets     =         2048"));
    }

    #[test]
    fn percentile_labels_read_as_nines() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(4.0), "99.99%");
    }

    #[test]
    fn plot_is_an_svg_with_the_curve() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 100).unwrap();
        }
        let path = std::env::temp_dir().join(format!("loadgen-plot-{}.svg", std::process::id()));
        save_plot(&h, &path, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("99.9%"));
        let empty = Histogram::<u64>::new(3).unwrap();
        assert!(save_plot(&empty, &path, "empty").is_err());
    }
}
