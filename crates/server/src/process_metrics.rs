//! The standard `process_*` metrics that Prometheus' client libraries export, read from
//! `/proc/self` at scrape time (Linux only; elsewhere they stay at zero).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Linux reports CPU times in clock ticks of 1/100 s to user space (`USER_HZ`).
const CLOCK_TICKS_PER_S: f64 = 100.0;
/// Resident set size is reported in pages.
const PAGE_BYTES: i64 = 4096;

#[derive(Default)]
pub struct ProcessMetrics {
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    resident_memory: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
}

/// What `/proc/self/stat` says, in the units Prometheus wants.
#[derive(Debug, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    start_ticks: u64,
    virtual_bytes: i64,
    resident_pages: i64,
}

/// Parse `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); field n is at index n - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_seconds: (num(14)? + num(15)?) as f64 / CLOCK_TICKS_PER_S,
        start_ticks: num(22)?,
        virtual_bytes: num(23)? as i64,
        resident_pages: num(24)? as i64,
    })
}

/// The soft `Max open files` limit from `/proc/<pid>/limits`.
fn parse_max_fds(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// The system's boot time from `/proc/stat`, in seconds since the epoch.
fn parse_boot_time(stat: &str) -> Option<i64> {
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

impl ProcessMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("process_cpu_seconds", "Total user and system CPU time spent in seconds.", self.cpu_seconds.clone());
        r.register("process_resident_memory_bytes", "Resident memory size in bytes.", self.resident_memory.clone());
        r.register("process_virtual_memory_bytes", "Virtual memory size in bytes.", self.virtual_memory.clone());
        r.register("process_open_fds", "Number of open file descriptors.", self.open_fds.clone());
        r.register("process_max_fds", "Maximum number of open file descriptors.", self.max_fds.clone());
        r.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.start_time.clone(),
        );
    }

    pub fn refresh(&self) {
        if let Some(s) = std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(parse_stat) {
            let grew = s.cpu_seconds - self.cpu_seconds.get();
            if grew > 0.0 {
                self.cpu_seconds.inc_by(grew);
            }
            self.resident_memory.set(s.resident_pages * PAGE_BYTES);
            self.virtual_memory.set(s.virtual_bytes);
            if let Some(boot) = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(parse_boot_time) {
                self.start_time.set(boot + (s.start_ticks as f64 / CLOCK_TICKS_PER_S) as i64);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits").ok().as_deref().and_then(parse_max_fds) {
            self.max_fds.set(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (quo rate) (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 123456 \
                    1048576000 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s, Stat { cpu_seconds: 3.0, start_ticks: 123456, virtual_bytes: 1048576000, resident_pages: 2560 });
    }

    #[test]
    fn limits_and_boot_time_are_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"), Some(1_700_000_000));
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let m = ProcessMetrics::default();
        m.refresh();
        assert!(m.resident_memory.get() > 0);
        assert!(m.open_fds.get() > 0);
        assert!(m.start_time.get() > 1_600_000_000);
    }
}
