//! Human-readable output: the same figures as the JSON report, laid out as a two-column table
//! for someone watching a terminal.

use std::fmt::Write as _;

use crate::histogram::LatencySummary;
use crate::idle::ConnReport;
use crate::pubsub::{PubSubReport, Scenario};

fn row(out: &mut String, key: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {key:<28} {value}");
}

fn latency_rows(out: &mut String, label: &str, l: &LatencySummary) {
    row(
        out,
        label,
        format_args!(
            "p50 {} µs  p99 {} µs  p99.9 {} µs  max {} µs  (n={})",
            l.p50_us, l.p99_us, l.p999_us, l.max_us, l.count
        ),
    );
}

/// Renders a pub-sub report as a table.
pub fn pubsub_table(r: &PubSubReport) -> String {
    let mut out = String::new();
    let rate = if r.target_rate > 0.0 {
        format!("{:.0} msg/s offered", r.target_rate)
    } else {
        "max (windowed)".into()
    };
    let _ = writeln!(
        out,
        "corvid-bench pub-sub: {} {}→{} qos{} mqtt{} payload {} B, {rate}, {:.1}s (+{:.1}s warm-up)",
        match r.scenario {
            Scenario::FanIn => "fan-in",
            Scenario::FanOut => "fan-out",
            Scenario::P2p => "p2p",
        },
        r.publishers,
        r.subscribers,
        r.qos,
        if r.protocol == 5 { "5" } else { "3.1.1" },
        r.payload_bytes,
        r.duration_s,
        r.warmup_s
    );
    row(&mut out, "sent", r.sent);
    row(&mut out, "expected deliveries", r.expected);
    row(&mut out, "delivered (unique)", r.delivered);
    row(&mut out, "lost", r.lost);
    row(&mut out, "duplicates", r.duplicates);
    if r.foreign > 0 {
        row(&mut out, "foreign payloads", r.foreign);
    }
    row(
        &mut out,
        "sent msg/s",
        format_args!("{:.0}", r.sent_per_sec),
    );
    row(
        &mut out,
        "delivered msg/s",
        format_args!("{:.0}", r.delivered_per_sec),
    );
    latency_rows(&mut out, "latency (from schedule)", &r.latency);
    latency_rows(&mut out, "latency (from send)", &r.latency_from_send);
    row(&mut out, "connect errors", r.connect_errors);
    row(&mut out, "run errors", r.run_errors);
    out
}

/// Renders an idle-connection report as a table.
pub fn conn_table(r: &ConnReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "corvid-bench conn: {} idle connections held {:.0}s",
        r.requested, r.hold_s
    );
    row(&mut out, "established", r.established);
    row(&mut out, "connect errors", r.connect_errors);
    row(&mut out, "dropped while held", r.dropped);
    row(
        &mut out,
        "connect time",
        format_args!("{:.2} s ({:.0} conn/s)", r.connect_s, r.connects_per_sec),
    );
    latency_rows(&mut out, "handshake", &r.handshake);
    row(&mut out, "open-file limit", r.nofile_limit);
    out
}
