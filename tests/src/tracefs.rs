//! The kernel's own uprobes through tracefs (no BPF): the independent
//! tracer the tests compare the agent's reads with.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// tracefs uprobe events of one group, removed on drop.
pub struct Uprobes {
    tracefs: PathBuf,
    group: String,
    events: Vec<String>,
}

impl Uprobes {
    /// A group named `{prefix}{pid}`, so parallel test processes never share one.
    pub fn new(prefix: &str) -> Uprobes {
        let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("uprobe_events").exists())
            .expect("tracefs with uprobe_events is not mounted");
        Uprobes { tracefs, group: format!("{prefix}{}", std::process::id()), events: Vec::new() }
    }

    /// One write(2) per command: tracefs parses each write as a whole
    /// command, and `writeln!` on a File writes its pieces one by one.
    fn command(&self, line: &str) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.tracefs.join("uprobe_events"))
            .and_then(|mut f| f.write_all(line.as_bytes()))
    }

    /// `p:GROUP/EVENT BIN:OFFSET FETCHARGS`.
    pub fn add(&mut self, event: &str, bin: &Path, offset: u64, fetchargs: &str) {
        let line = format!("p:{}/{event} {}:{offset:#x} {fetchargs}\n", self.group, bin.display());
        self.command(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        self.events.push(event.to_string());
    }

    /// Enables the group and clears the trace buffer.
    pub fn enable(&self) {
        std::fs::write(self.tracefs.join("events").join(&self.group).join("enable"), "1").expect("enable");
        std::fs::write(self.tracefs.join("trace"), "").expect("clear trace");
    }

    pub fn trace(&self) -> String {
        std::fs::read_to_string(self.tracefs.join("trace")).expect("trace")
    }

    /// Every hit of `event`, as its numeric fetchargs.
    pub fn hits(&self, event: &str) -> Vec<HashMap<String, i64>> {
        self.trace()
            .lines()
            .filter(|l| l.contains(&format!(" {event}: ")))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|w| w.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect()
            })
            .collect()
    }
}

impl Drop for Uprobes {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.tracefs.join("events").join(&self.group).join("enable"), "0") {
            eprintln!("disabling {}: {e}", self.group);
        }
        for e in &self.events {
            if let Err(err) = self.command(&format!("-:{}/{e}\n", self.group)) {
                eprintln!("removing {}/{e}: {err}", self.group);
            }
        }
    }
}

/// A catalog read (`watchscope inspect --json`'s `args[i]`) as a tracefs
/// fetch: `+16(+0(%bx))`. tracefs spells rbx as `%bx` but r8 as `%r8`.
pub fn fetch(arg: &Value) -> String {
    let reg = arg["source"]["register"].as_str().expect("register source on amd64 register ABI");
    let reg = if reg[1..].chars().all(|c| c.is_ascii_digit()) { format!("%{reg}") } else { format!("%{}", &reg[1..]) };
    arg["derefs"].as_array().expect("derefs").iter().fold(reg, |s, d| format!("+{}({s})", d.as_u64().expect("offset")))
}
