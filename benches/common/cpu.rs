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

/// The CPUs this process may run on, ascending (`Cpus_allowed_list` in
/// `/proc/self/status`, e.g. `0-1` or `0,2-3`); empty where there is none.
#[allow(dead_code)] // not every bench that includes this file pins threads
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let Some(list) = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
    else {
        return Vec::new();
    };
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        let mut ends = part.split('-').map(|x| x.parse::<usize>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => cpus.push(a),
            (Some(Ok(a)), Some(Ok(b))) if a <= b => cpus.extend(a..=b),
            _ => return Vec::new(),
        }
    }
    cpus
}
