//! CPU time of this process's threads, from `/proc/self/task/*/stat`, for
//! the benches that run a psync server in-process and charge it its CPU.

use std::time::Duration;

/// Whether a thread named `name` runs psync's server: the thread the bench
/// starts it on (named `control`) or one of the workers that run its packet
/// loop (`psync-worker-N`).
pub fn is_server(name: &str, control: &str) -> bool {
    name == control || name.starts_with("psync-worker-")
}

/// CPU time of this process's threads whose names `pick` accepts, summed;
/// `None` where there is no procfs or no such thread. (Pick by name, not by
/// prefix alone: the main thread is named after the bench binary.)
///
/// Read from each thread's `schedstat` (the scheduler's own sum of the time
/// it ran, in nanoseconds), or, where a kernel has none, from `stat`'s user
/// and system times, which count 10-ms ticks.
pub fn thread_cpu(pick: impl Fn(&str) -> bool) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut found = false;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended
        };
        if !pick(comm.trim_end()) {
            continue;
        }
        let ran = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .map(Duration::from_nanos);
        let ran = match ran {
            Some(d) => d,
            None => {
                let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                    continue;
                };
                // Fields after the parenthesised name: state is field 3,
                // utime 14, stime 15.
                let rest = &stat[stat.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                // USER_HZ is 100 on every Linux configuration that matters here.
                Duration::from_millis(ticks * 10)
            }
        };
        total += ran;
        found = true;
    }
    found.then_some(total)
}
