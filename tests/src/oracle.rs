//! Test oracles: parsers of what the guest itself prints (`ps`, `/proc/PID/comm`,
//! `/proc/PID/stack` dumps) and comparisons of introspect's views with them. Test code only;
//! they live here, not in introspect. introspect's own integration tests include this file
//! with `#[path]` (they cannot depend on this crate, which depends on introspect).

use introspect::tasks::Task;

/// Parses `ps -o pid,comm,stat` output into `(pid, comm, stat)`.
pub fn parse_ps(text: &str) -> Vec<(i32, String, String)> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("PID"))
        .skip(1)
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            Some((
                t.first()?.parse().ok()?,
                (*t.get(1)?).to_string(),
                t.get(2).copied().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

/// What busybox `ps` shows as COMMAND: the name of /proc/PID/stat (= /proc/PID/comm) read into
/// a 16-byte buffer, i.e. its first 15 bytes.
pub fn ps_comm(comm: &str) -> &[u8] {
    &comm.as_bytes()[..comm.len().min(15)]
}

/// Compares our processes (`pid == tgid`, not idle) with `ps -o pid,comm,stat` rows: same pids,
/// `ps` comm equal to the first 15 bytes of our /proc name ([`ps_comm`]), same state letter.
/// Rows whose pid is in `ignore` (e.g. the `ps` process itself, gone by the time memory is
/// read) are skipped. `Err` lists every difference.
pub fn compare_with_ps(
    tasks: &[Task],
    ps: &[(i32, String, String)],
    ignore: &[i32],
) -> Result<(), String> {
    let mut errs = Vec::new();
    let ours: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.is_process() && !ignore.contains(&t.pid))
        .collect();
    for (pid, comm, stat) in ps.iter().filter(|r| !ignore.contains(&r.0)) {
        match ours.iter().find(|t| t.pid == *pid) {
            None => errs.push(format!("pid {pid} ({comm}) in ps but not found")),
            Some(t) => {
                if comm.as_bytes() != ps_comm(&t.comm) {
                    errs.push(format!("pid {pid}: comm ps `{comm}` vs ours `{}`", t.comm));
                }
                if !stat.starts_with(t.state_char) {
                    errs.push(format!(
                        "pid {pid}: state ps `{stat}` vs ours `{}` ({:#x})",
                        t.state_char, t.state
                    ));
                }
            }
        }
    }
    for t in &ours {
        if !ps.iter().any(|r| r.0 == t.pid) {
            errs.push(format!("pid {} ({}) found but not in ps", t.pid, t.comm));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// Compares our names with /proc/PID/comm as the guest printed it (`(pid, comm)` rows, e.g.
/// from a `cat /proc/PID/comm` loop): every row's pid must be listed with exactly that name.
/// `Err` lists every difference.
pub fn compare_with_proc_comm(tasks: &[Task], rows: &[(i32, String)]) -> Result<(), String> {
    let errs: Vec<String> = rows
        .iter()
        .filter_map(|(pid, comm)| match tasks.iter().find(|t| t.pid == *pid) {
            None => Some(format!("pid {pid} ({comm}) in /proc but not found")),
            Some(t) if t.comm != *comm => Some(format!(
                "pid {pid}: /proc/PID/comm `{comm}` vs ours `{}` (task_struct.comm `{}`)",
                t.comm, t.task_comm
            )),
            Some(_) => None,
        })
        .collect();
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// Parses a `stacks.txt`-style dump ("== PID COMM" then `/proc/PID/stack` lines) into
/// `(pid, comm, lines)`.
pub fn parse_proc_stacks(text: &str) -> Vec<(i32, String, Vec<String>)> {
    let mut out: Vec<(i32, String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("== ") {
            let mut it = rest.splitn(2, ' ');
            let pid = it.next().and_then(|p| p.parse().ok()).unwrap_or(-1);
            out.push((pid, it.next().unwrap_or("").to_string(), Vec::new()));
        } else if line.starts_with("[<") {
            if let Some(last) = out.last_mut() {
                last.2.push(line.trim_end().to_string());
            }
        }
    }
    out
}

/// Compares our view of a stack with the guest's `/proc/PID/stack` lines; `Err` describes
/// the first difference.
pub fn compare_stack_with_proc(ours: &[String], proc_lines: &[String]) -> Result<(), String> {
    for i in 0..ours.len().max(proc_lines.len()) {
        let a = ours.get(i).map(String::as_str).unwrap_or("<missing>");
        let b = proc_lines.get(i).map(String::as_str).unwrap_or("<missing>");
        if a != b {
            return Err(format!(
                "line {i}: ours `{a}` vs /proc `{b}`\nours:\n{}\n/proc:\n{}",
                ours.join("\n"),
                proc_lines.join("\n")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_shows_15_bytes() {
        assert_eq!(ps_comm("sh"), b"sh");
        assert_eq!(ps_comm("kworker/0:0-rcu_gp"), b"kworker/0:0-rcu");
        assert_eq!(ps_comm("rcu_tasks_kthre"), b"rcu_tasks_kthre");
    }
}
