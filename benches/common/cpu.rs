//! CPU time of this process's threads, from `/proc/self/task/*/stat`, for
//! the benches that run a psync server in-process and charge it its CPU.

use std::time::Duration;

/// Whether a thread named `name` runs psync's server: the thread the bench
/// starts it on (named `control`) or one of the workers that run its packet
/// loop (`psync-worker-N`).
pub fn is_server(name: &str, control: &str) -> bool {
    name == control || name.starts_with("psync-worker-")
}

/// CPU time (user + system) of this process's threads whose names `pick`
/// accepts, summed; `None` where there is no procfs or no such thread.
/// (Pick by name, not by prefix alone: the main thread is named after the
/// bench binary.)
pub fn thread_cpu(pick: impl Fn(&str) -> bool) -> Option<Duration> {
    let mut ticks = 0;
    let mut found = false;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended
        };
        if !pick(comm.trim_end()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        found = true;
    }
    // USER_HZ is 100 on every Linux configuration that matters here.
    found.then(|| Duration::from_millis(ticks * 10))
}
