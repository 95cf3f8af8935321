//! tracefs: where it is mounted, which tracepoints exist, and the field
//! offsets of a tracepoint record (its `format` file is the kernel's contract
//! for those offsets).

use std::path::PathBuf;

use thiserror::Error;

use super::HostRoot;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing); \
         mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    NotMounted,
    #[error("tracepoint {category}:{name} does not exist on this kernel ({path})")]
    NoTracepoint { category: String, name: String, path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("field `{field}` not found in {path}")]
    NoField { field: String, path: PathBuf },
}

/// A tracefs mount point.
#[derive(Clone, Debug)]
pub struct Tracefs {
    pub dir: PathBuf,
}

impl Tracefs {
    /// Finds tracefs under the host root, preferring the modern location.
    pub fn find(root: &HostRoot) -> Result<Self, TracefsError> {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(|p| root.path(p))
            .find(|p| p.join("events").is_dir())
            .map(|dir| Tracefs { dir })
            .ok_or(TracefsError::NotMounted)
    }

    fn event_dir(&self, category: &str, name: &str) -> PathBuf {
        self.dir.join("events").join(category).join(name)
    }

    /// Whether `category:name` exists (its `id` file is what perf_event_open needs).
    pub fn tracepoint_exists(&self, category: &str, name: &str) -> Result<(), TracefsError> {
        let path = self.event_dir(category, name).join("id");
        if path.is_file() {
            Ok(())
        } else {
            Err(TracefsError::NoTracepoint { category: category.into(), name: name.into(), path })
        }
    }

    /// Byte offset of `field` in the `category:name` record.
    pub fn field_offset(&self, category: &str, name: &str, field: &str) -> Result<u32, TracefsError> {
        let path = self.event_dir(category, name).join("format");
        let text =
            std::fs::read_to_string(&path).map_err(|source| TracefsError::Read { path: path.clone(), source })?;
        parse_field_offset(&text, field).ok_or(TracefsError::NoField { field: field.into(), path })
    }

    pub fn uprobe_events(&self) -> PathBuf {
        self.dir.join("uprobe_events")
    }
}

/// Finds `offset:N;` on the line declaring `field` in a tracefs format file,
/// e.g. `field:__data_loc char[] filename; offset:8; size:4; signed:0;`
/// (tab-separated in the real file).
pub fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        // The field name is the last identifier of the declaration, before any [N].
        let ident = decl.trim().rsplit([' ', '*']).next()?;
        let ident = ident.split('[').next()?;
        if ident != field {
            return None;
        }
        let off = rest.split(';').find_map(|kv| kv.trim().strip_prefix("offset:"))?;
        off.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXEC_FORMAT: &str = "name: sched_process_exec
ID: 311
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;
";

    #[test]
    fn finds_offsets() {
        assert_eq!(parse_field_offset(EXEC_FORMAT, "filename"), Some(8));
        assert_eq!(parse_field_offset(EXEC_FORMAT, "pid"), Some(12));
        assert_eq!(parse_field_offset(EXEC_FORMAT, "old_pid"), Some(16));
        assert_eq!(parse_field_offset(EXEC_FORMAT, "common_pid"), Some(4));
        assert_eq!(parse_field_offset(EXEC_FORMAT, "nope"), None);
        assert_eq!(parse_field_offset("field:char comm[16];\toffset:8;\tsize:16;", "comm"), Some(8));
    }
}
