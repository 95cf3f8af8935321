//! The kernel memory the agent's maps hold: measured, and projected to any
//! CPU count.
//!
//! Measured: the kernel's own accounting of each map (`memlock` in the
//! map fd's `/proc/self/fdinfo`, its `mem_usage` since Linux 6.4), exported
//! as `watchscope_bpf_map_bytes{map}`. Projected: from the object's map
//! definitions (type, key and value size, entries), with the kernel's
//! per-element costs, for `watchscope check` and the design bound (every
//! counter and histogram array is shared by the CPUs, so only the frame scan
//! buffer and the rings' high-water marks grow with them; see README, "The
//! agent's own metrics and what they cost").

use aya_obj::Object;

/// One map and the bytes of kernel memory it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapBytes {
    pub name: String,
    pub bytes: u64,
}

/// Every BPF map this process holds a file descriptor of, with the kernel's
/// accounting of its memory. Maps whose name cannot be read are named by id.
/// Read once after the object is loaded: every map is created then, and
/// preallocated, so its memory does not change while the agent runs.
pub fn measured() -> Vec<MapBytes> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else { return Vec::new() };
    let mut seen = std::collections::BTreeMap::new();
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let Some((id, bytes)) = parse_fdinfo(&text) else { continue };
        // One map may have several fds (a duplicate held for statistics).
        seen.entry(id).or_insert(bytes);
    }
    let defs = agent_maps().unwrap_or_default();
    seen.into_iter()
        .map(|(id, bytes)| {
            let name = aya::maps::MapInfo::from_id(id)
                .ok()
                .and_then(|i| {
                    let short = i.name_as_str()?;
                    Some(full_name(&defs, short, i.key_size(), i.value_size()).unwrap_or(short).to_string())
                })
                .unwrap_or_else(|| format!("id_{id}"));
            MapBytes { name, bytes }
        })
        .collect()
}

/// The object's name of a map the kernel names `short`: the kernel keeps 15
/// bytes of a name, so `WS_WINDOW_INNER_HIST` and `WS_WINDOW_INNER_EVENTS`
/// both come back as `WS_WINDOW_INNER`; the key and value sizes tell them
/// apart. `None` when no definition, or more than one, fits.
fn full_name<'a>(defs: &'a [MapDef], short: &str, key_size: u32, value_size: u32) -> Option<&'a str> {
    let mut fits = defs.iter().filter(|d| {
        d.name.get(..KERNEL_NAME_MAX).unwrap_or(&d.name) == short
            && d.key_size == key_size
            && d.value_size == value_size
    });
    let one = fits.next()?;
    fits.next().is_none().then_some(one.name.as_str())
}

/// The bytes of a map name the kernel keeps (BPF_OBJ_NAME_LEN less the NUL).
const KERNEL_NAME_MAX: usize = 15;

/// (map id, memlock bytes) of a map fd's fdinfo; `None` for other fds.
fn parse_fdinfo(text: &str) -> Option<(u32, u64)> {
    let field = |key: &str| super::stats::fdinfo_field(text, key);
    field("map_type")?;
    let id = u32::try_from(field("map_id")?).ok()?;
    Some((id, field("memlock")?))
}

/// A map as the object defines it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("the agent's eBPF object does not parse: {0}")]
pub struct ParseError(String);

/// The map definitions of an eBPF object (the agent's own, embedded).
pub fn object_maps(object: &[u8]) -> Result<Vec<MapDef>, ParseError> {
    let obj = Object::parse(object).map_err(|e| ParseError(e.to_string()))?;
    let mut maps: Vec<MapDef> = obj
        .maps
        .iter()
        .map(|(name, m)| MapDef {
            name: name.clone(),
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
        })
        .collect();
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(maps)
}

/// The agent's own maps (its embedded object).
pub fn agent_maps() -> Result<Vec<MapDef>, ParseError> {
    object_maps(crate::attach::OBJECT)
}

/// The count of CPUs in a kernel CPU list (`0-3,8-11`, `0`).
pub fn possible_cpus(list: &str) -> Option<u64> {
    let mut n = 0u64;
    for part in list.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
            None => {
                let c = part.parse::<u64>().ok()?;
                (c, c)
            }
        };
        n += hi.checked_sub(lo)? + 1;
    }
    (n > 0).then_some(n)
}

// The map types the agent uses (uapi `enum bpf_map_type`).
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_HASH: u32 = 5;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const LRU_PERCPU_HASH: u32 = 10;
const RINGBUF: u32 = 27;

/// A hash element's overhead beyond its key and value (`struct htab_elem`
/// with its LRU node, as the kernel's `htab_map_mem_usage` counts it):
/// measured on Linux 6.18 for every hash map of the agent, within 0.5 %.
const HTAB_ELEM: u64 = 64;
/// Per element of a per-CPU array: the pointer to its per-CPU values.
const PERCPU_PTR: u64 = 8;

fn round8(n: u32) -> u64 {
    u64::from(n).div_ceil(8) * 8
}

/// The kernel memory `def` takes on a node with `cpus` possible CPUs, as
/// the kernel accounts it (to a few kilobytes of fixed overhead per map).
pub fn projected(def: &MapDef, cpus: u64) -> u64 {
    let n = u64::from(def.max_entries);
    let (k, v) = (round8(def.key_size), round8(def.value_size));
    match def.map_type {
        ARRAY => n * v,
        PERCPU_ARRAY => n * (v * cpus + PERCPU_PTR),
        // Preallocated elements, plus one spare per CPU for updates.
        HASH => (n + cpus) * (HTAB_ELEM + k + v),
        LRU_HASH => n * (HTAB_ELEM + k + v),
        PERCPU_HASH => (n + cpus) * (HTAB_ELEM + k + PERCPU_PTR) + n * v * cpus,
        LRU_PERCPU_HASH => n * (HTAB_ELEM + k + PERCPU_PTR) + n * v * cpus,
        RINGBUF => n,
        _ => n * (k + v),
    }
}

/// Whether `def`'s memory grows with the CPU count.
pub fn per_cpu(def: &MapDef) -> bool {
    matches!(def.map_type, PERCPU_ARRAY | PERCPU_HASH | LRU_PERCPU_HASH)
}

/// The design bound: the agent's maps at 96 possible CPUs (a large
/// control-plane node) stay within this.
pub const BOUND_AT_96_CPUS: u64 = 32 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_kernel_names_map_back_to_the_objects_names() {
        let defs = agent_maps().unwrap();
        let hist = size_of::<agent_common::Histogram>() as u32;
        assert_eq!(full_name(&defs, "WS_WINDOW_INNER", 4, hist), Some("WS_WINDOW_INNER_HIST"));
        assert_eq!(full_name(&defs, "WS_WINDOW_INNER", 4, 8), Some("WS_WINDOW_INNER_EVENTS"));
        assert_eq!(full_name(&defs, "WS_COUNTERS", 4, 8), Some("WS_COUNTERS"));
        assert_eq!(full_name(&defs, "WS_NOT_OURS", 4, 8), None);
        // No two of the agent's maps share a kernel name, key and value size.
        for d in &defs {
            let short = d.name.get(..KERNEL_NAME_MAX).unwrap_or(&d.name);
            assert_eq!(full_name(&defs, short, d.key_size, d.value_size), Some(d.name.as_str()), "{}", d.name);
        }
    }

    #[test]
    fn possible_cpu_lists_are_counted() {
        assert_eq!(possible_cpus("0-1\n"), Some(2));
        assert_eq!(possible_cpus("0"), Some(1));
        assert_eq!(possible_cpus("0-3,8-11"), Some(8));
        assert_eq!(possible_cpus("0-95"), Some(96));
        for bad in ["", "x", "3-1", "0-", "1,,2"] {
            assert_eq!(possible_cpus(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fdinfo_of_a_map_gives_its_id_and_memory() {
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2061\nmap_type:\t9\nkey_size:\t16\n\
                   value_size:\t24\nmax_entries:\t16384\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t1704896\n\
                   map_id:\t62230\nfrozen:\t0\n";
        assert_eq!(parse_fdinfo(map), Some((62230, 1_704_896)));
        let prog = "pos:\t0\nflags:\t02000002\nprog_type:\t2\nprog_jited:\t1\nmemlock:\t4096\nprog_id:\t93\n";
        assert_eq!(parse_fdinfo(prog), None);
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn the_model_matches_what_the_kernel_accounted() {
        // Measured on this machine's kernel (6.18, 2 possible CPUs) for maps
        // of the agent: memlock from fdinfo.
        let def = |map_type, key_size, value_size, max_entries| MapDef {
            name: String::new(),
            map_type,
            key_size,
            value_size,
            max_entries,
        };
        for (d, kernel) in [
            (def(LRU_HASH, 8, 8, 65536), 5_243_840u64),
            (def(LRU_HASH, 16, 24, 16384), 1_704_896),
            (def(LRU_HASH, 16, 8, 16384), 1_442_752),
            (def(LRU_HASH, 4, 24, 8192), 787_392),
            (def(HASH, 16, 16, 4096), 394_352),
            (def(HASH, 4, 4, 4096), 328_784),
            (def(ARRAY, 4, 48, 65536), 3_146_040),
            (def(ARRAY, 4, 856, 896), 767_288),
            (def(PERCPU_ARRAY, 4, 8, 768), 18_744),
            (def(RINGBUF, 0, 0, 1 << 20), 1_065_288),
        ] {
            let model = projected(&d, 2);
            let err = model.abs_diff(kernel) as f64 / kernel as f64;
            assert!(err < 0.02 || model.abs_diff(kernel) < 20_000, "{d:?}: model {model}, kernel {kernel}");
        }
    }

    #[test]
    fn the_agents_maps_stay_within_the_bound_at_96_cpus() {
        let maps = agent_maps().expect("the embedded object parses");
        assert!(maps.len() > 30, "{maps:?}");
        let at = |cpus| maps.iter().map(|m| projected(m, cpus)).sum::<u64>();
        let (at2, at96) = (at(2), at(96));
        eprintln!("agent maps: {at2} bytes at 2 CPUs, {at96} at 96");
        assert!(at96 <= BOUND_AT_96_CPUS, "{} MiB at 96 CPUs: {maps:#?}", at96 >> 20);
        // What grows with the CPUs is small: under 8 KiB per CPU.
        assert!((at96 - at2) / 94 < 8 << 10, "{} bytes per CPU", (at96 - at2) / 94);
    }
}
