//! The TCP ports a process listens on, from /proc: the socket inodes among
//! its fds, matched against the LISTEN rows of /proc/<pid>/net/tcp{,6}
//! (the process's own network namespace view).

use std::collections::{BTreeSet, HashSet};

use crate::host::HostRoot;

/// Listening TCP ports of process `pid` (empty if it is gone).
pub fn listening_ports(root: &HostRoot, pid: u32) -> BTreeSet<u16> {
    let inodes = socket_inodes(root, pid);
    let mut ports = BTreeSet::new();
    if inodes.is_empty() {
        return ports;
    }
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(root.path(format!("/proc/{pid}/net/{table}"))) {
            ports.extend(parse_listeners(&text).filter(|(_, ino)| inodes.contains(ino)).map(|(port, _)| port));
        }
    }
    ports
}

fn socket_inodes(root: &HostRoot, pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(root.path(format!("/proc/{pid}/fd"))) else { return HashSet::new() };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// (local port, inode) of every LISTEN row of a /proc/net/tcp{,6} table.
pub fn parse_listeners(table: &str) -> impl Iterator<Item = (u16, u64)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.get(3) != Some(&"0A") {
            return None;
        }
        let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        let inode = f.get(9)?.parse().ok()?;
        Some((port, inode))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_rows_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4650 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:D2F0 0100007F:4650 01 00000000:00000000 00:00000000 00000000     0        0 123457 1 0000000000000000 20 4 30 10 -1
   2: garbage
";
        let rows: Vec<_> = parse_listeners(table).collect();
        assert_eq!(rows, vec![(0x4650, 123456)]);
        // Our own listener shows up through the real /proc.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening_ports(&HostRoot::default(), std::process::id()).contains(&port));
    }
}
