//! CPU time and resident memory of a process, read from Linux's /proc.

use std::fs;
use std::process::Command;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// user + system CPU time, in seconds
    pub cpu_secs: f64,
    /// resident set size, in KiB
    pub rss_kib: u64,
}

/// Reads /proc/<pid>/stat and /proc/<pid>/status.
#[derive(Debug, Clone)]
pub struct ProcMon {
    stat_path: String,
    status_path: String,
    ticks_per_sec: f64,
}

impl ProcMon {
    /// `pid` of `None` watches this process.
    pub fn new(pid: Option<u32>) -> Self {
        let dir = match pid {
            Some(p) => format!("/proc/{p}"),
            None => "/proc/self".to_string(),
        };
        ProcMon { stat_path: format!("{dir}/stat"), status_path: format!("{dir}/status"), ticks_per_sec: clk_tck() }
    }

    pub fn read(&self) -> Option<Reading> {
        let stat = fs::read_to_string(&self.stat_path).ok()?;
        let status = fs::read_to_string(&self.status_path).ok()?;
        let ticks = parse_cpu_ticks(&stat)?;
        let rss_kib = parse_rss_kib(&status)?;
        Some(Reading { cpu_secs: ticks as f64 / self.ticks_per_sec, rss_kib })
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every usual Linux).
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime from /proc/<pid>/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from after its last ')': field 3 (state) is index 0 there,
/// utime (field 14) index 11 and stime (field 15) index 12.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:  12345 kB` from /proc/<pid>/status.
fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn parses_rss() {
        let status = "Name:\thearth\nVmPeak:\t  99999 kB\nVmRSS:\t   24576 kB\nThreads:\t4\n";
        assert_eq!(parse_rss_kib(status), Some(24576));
    }

    #[test]
    fn reads_itself() {
        let r = ProcMon::new(None).read().expect("/proc/self is readable");
        assert!(r.rss_kib > 0);
    }
}
