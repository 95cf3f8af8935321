//! Struct layouts the watch-path probes read: the one place that says which
//! struct facts a probe depends on, where in a binary each fact is found,
//! which layouts are verified (with the evidence), and how a binary's own
//! layout is identified.
//!
//! Why the binary decides, not its version: Debian builds etcd in GOPATH
//! mode and records no module versions, and its etcd 3.3.25 carries the
//! gogo `XXX_` fields that upstream added in 3.5 (`mvccpb.Event` 56 bytes,
//! where bookworm's 3.4.23 has 24). So the facts are read from Go's runtime
//! type descriptors, which stripped binaries keep (`inspect::gotypes`), and
//! matched against the verified profiles below. A module version is only a
//! fallback for a binary whose descriptors cannot be read, and a cross-check
//! when both exist. When the sources disagree, or the binary's layout is
//! none of the verified ones, the watch roles are refused with the fact that
//! failed: a wrong read is worse than no read.

use serde::Serialize;

use super::{
    Inspection, TypeError,
    catalog::{Abi, Component},
    elf::Arch,
};

/// How many facts a profile holds.
pub const FACTS: usize = 16;

/// One struct fact a probe reads (a byte offset or a size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fact {
    /// `sizeof(mvccpb.Event)`: the stride of a `[]mvccpb.Event` value.
    EventSize,
    /// `mvccpb.Event.Kv` (`*KeyValue`).
    EventKv,
    /// `mvccpb.KeyValue.ModRevision`: the event's revision.
    KvModRevision,
    /// `etcdserverpb.WatchResponse.Header` (`*ResponseHeader`).
    RespHeader,
    /// `etcdserverpb.WatchResponse.WatchId`.
    RespWatchId,
    /// `etcdserverpb.WatchResponse.Events` (`[]*mvccpb.Event`).
    RespEvents,
    /// `etcdserverpb.WatchResponse.Created` (bool): a watch's creation
    /// response carries no events and is no progress notification.
    RespCreated,
    /// `etcdserverpb.WatchResponse.Canceled` (bool).
    RespCanceled,
    /// `etcdserverpb.WatchResponse.CompactRevision`: set on a response that
    /// cancels a watch on a compacted revision.
    RespCompactRevision,
    /// `etcdserverpb.ResponseHeader.ClusterId`.
    HdrClusterId,
    /// `etcdserverpb.ResponseHeader.MemberId`.
    HdrMemberId,
    /// `etcdserverpb.ResponseHeader.Revision`.
    HdrRevision,
    /// `mvcc.WatchResponse.WatchID`: `watcher.send` takes the struct by value,
    /// so its field order is the order of the flattened arguments.
    MvccWatchId,
    /// `mvcc.WatchResponse.Events`.
    MvccEvents,
    /// `mvcc.WatchResponse.Revision`.
    MvccRevision,
    /// `mvcc.WatchResponse.CompactRevision`.
    MvccCompactRevision,
}

impl Fact {
    pub const ALL: [Fact; FACTS] = [
        Fact::EventSize,
        Fact::EventKv,
        Fact::KvModRevision,
        Fact::RespHeader,
        Fact::RespWatchId,
        Fact::RespEvents,
        Fact::RespCreated,
        Fact::RespCanceled,
        Fact::RespCompactRevision,
        Fact::HdrClusterId,
        Fact::HdrMemberId,
        Fact::HdrRevision,
        Fact::MvccWatchId,
        Fact::MvccEvents,
        Fact::MvccRevision,
        Fact::MvccCompactRevision,
    ];

    /// Where the binary holds this fact: (type string, field or `None` for
    /// the struct's size).
    pub fn source(self) -> (&'static str, Option<&'static str>) {
        match self {
            Fact::EventSize => ("mvccpb.Event", None),
            Fact::EventKv => ("mvccpb.Event", Some("Kv")),
            Fact::KvModRevision => ("mvccpb.KeyValue", Some("ModRevision")),
            Fact::RespHeader => ("etcdserverpb.WatchResponse", Some("Header")),
            Fact::RespWatchId => ("etcdserverpb.WatchResponse", Some("WatchId")),
            Fact::RespEvents => ("etcdserverpb.WatchResponse", Some("Events")),
            Fact::RespCreated => ("etcdserverpb.WatchResponse", Some("Created")),
            Fact::RespCanceled => ("etcdserverpb.WatchResponse", Some("Canceled")),
            Fact::RespCompactRevision => ("etcdserverpb.WatchResponse", Some("CompactRevision")),
            Fact::HdrClusterId => ("etcdserverpb.ResponseHeader", Some("ClusterId")),
            Fact::HdrMemberId => ("etcdserverpb.ResponseHeader", Some("MemberId")),
            Fact::HdrRevision => ("etcdserverpb.ResponseHeader", Some("Revision")),
            Fact::MvccWatchId => ("mvcc.WatchResponse", Some("WatchID")),
            Fact::MvccEvents => ("mvcc.WatchResponse", Some("Events")),
            Fact::MvccRevision => ("mvcc.WatchResponse", Some("Revision")),
            Fact::MvccCompactRevision => ("mvcc.WatchResponse", Some("CompactRevision")),
        }
    }

    pub fn describe(self) -> String {
        match self.source() {
            (t, None) => format!("sizeof({t})"),
            (t, Some(f)) => format!("{t}.{f}"),
        }
    }

    fn index(self) -> usize {
        Fact::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// A layout that was checked against running programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: &'static str,
    /// Which builds have it (for humans; the binary's facts decide).
    pub builds: &'static str,
    /// Every fact's value, in [`Fact::ALL`] order.
    pub values: [u64; FACTS],
    /// How the reads were checked, and on which builds.
    pub evidence: &'static str,
    /// The (architecture, calling convention) pairs the evidence covers.
    #[serde(skip)]
    pub verified_for: &'static [(Arch, Abi)],
}

impl Profile {
    pub fn get(&self, f: Fact) -> u64 {
        self.values[f.index()]
    }
}

const AMD64_REGISTER: &[(Arch, Abi)] = &[(Arch::X86_64, Abi::Register)];
const AMD64_BOTH: &[(Arch, Abi)] = &[(Arch::X86_64, Abi::Register), (Arch::X86_64, Abi::Stack)];

/// The etcd layouts watchscope reads. Offsets are the same in both; the
/// gogo `XXX_` fields (`XXX_NoUnkeyedLiteral`, `XXX_unrecognized`,
/// `XXX_sizecache`) only grow the structs, which changes the stride of an
/// `[]mvccpb.Event` (24 → 56).
pub static ETCD_PROFILES: &[Profile] = &[
    Profile {
        name: "etcd-plain",
        builds: "etcd 3.4 without gogo XXX_ fields (Debian bookworm's 3.4.23)",
        values: [24, 8, 32, 0, 8, 56, 16, 17, 24, 0, 8, 16, 0, 8, 32, 40],
        evidence: "etcd 3.4.23/go1.19.8 (Debian bookworm) amd64: tracefs uprobes at watcher.send and Send gave the \
                   revisions and watch ids etcdctl reported (tests/tests/inspect.rs etcd_arg_reads_match_tracefs), \
                   and tests/tests/etcd_watch.rs counts every event of N puts and a K-put txn at every stage",
        verified_for: AMD64_REGISTER,
    },
    Profile {
        name: "etcd-gogo-xxx",
        builds: "etcd 3.5 and 3.6 (Debian trixie's 3.5.16, sid's 3.5.30), Debian bullseye's 3.3.25",
        values: [56, 8, 32, 0, 8, 56, 16, 17, 24, 0, 8, 16, 0, 8, 32, 40],
        evidence: "etcd 3.5.30/go1.26.4 (Debian sid) and 3.5.16/go1.24.0 (Debian trixie) amd64, GOPATH builds: \
                   type descriptors read from the binaries, and tests/tests/etcd_watch.rs (etcd_3_5_16, \
                   etcd_3_5_30) counts every event of N puts and a K-put txn at every stage with no read error, \
                   progress responses apart, and the slow watcher in its send stages; etcd 3.3.25/go1.15.9 \
                   (Debian bullseye, stack ABI, github.com/coreos/etcd) likewise (etcd_3_3_25)",
        verified_for: AMD64_BOTH,
    },
];

/// Where a fact's value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "detail")]
pub enum FactSource {
    /// The binary's type descriptors agree with the profile.
    Binary,
    /// Absent from the binary (the type is not linked, or has no
    /// descriptor); the value is the profile's.
    Profile(String),
}

/// The layout chosen for one binary, or why none was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EtcdLayout {
    /// The verified profile this binary's layout is, if any.
    pub profile: Option<&'static str>,
    /// Whether the profile's evidence covers this architecture and ABI.
    pub verified: bool,
    /// What the binary itself says, fact by fact (`None`: not found).
    pub binary: Vec<(Fact, Option<u64>)>,
    /// How the choice was made (type descriptors, module version).
    pub how: String,
    /// Why the watch roles must not use it, if they must not.
    pub refusal: Option<String>,
    #[serde(skip)]
    values: Option<[u64; FACTS]>,
}

impl EtcdLayout {
    /// A fact's value for the probes, only when the layout may be used.
    pub fn get(&self, f: Fact) -> Option<u64> {
        if self.refusal.is_some() {
            return None;
        }
        self.values.map(|v| v[f.index()])
    }
}

/// What the type descriptors say, fact by fact: `Ok(None)` when the type
/// or field is not in the binary, `Err` when reading it failed.
pub fn binary_facts(insp: &Inspection) -> Vec<(Fact, Result<Option<u64>, String>)> {
    let mut cache: Vec<(&str, Result<Option<super::StructLayout>, String>)> = Vec::new();
    Fact::ALL
        .iter()
        .map(|&fact| {
            let (ty, field) = fact.source();
            if !cache.iter().any(|(t, _)| *t == ty) {
                let got = match insp.struct_layout(ty) {
                    Ok(l) => Ok(Some(l)),
                    Err(TypeError::NotFound(_)) => Ok(None),
                    Err(e) => Err(e.to_string()),
                };
                cache.push((ty, got));
            }
            let got = cache.iter().find(|(t, _)| *t == ty).map(|(_, r)| r.clone()).unwrap_or(Ok(None));
            let value = got.map(|l| {
                l.and_then(|l| match field {
                    None => Some(l.size),
                    Some(f) => l.field(f).map(|f| f.offset),
                })
            });
            (fact, value)
        })
        .collect()
}

/// The etcd API module version the binary was built with, if recorded
/// (release builds; Debian's GOPATH builds have none).
fn module_version(insp: &Inspection) -> Option<(u32, u32)> {
    let bi = insp.build_info.as_ref()?;
    let main = bi.main.iter();
    main.chain(bi.deps.iter()).find_map(|m| {
        let etcd = m.path.starts_with("go.etcd.io/etcd") || m.path.starts_with("github.com/coreos/etcd");
        let v = m.version.as_deref()?.strip_prefix('v')?;
        let mut parts = v.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        (etcd && major == 3).then_some((major, minor))
    })
}

/// The profile a module version implies (upstream's history: the gogo
/// `XXX_` fields arrived with etcd 3.5).
fn profile_for_version(v: (u32, u32)) -> Option<&'static Profile> {
    let name = match v {
        (3, 4) => "etcd-plain",
        (3, m) if m >= 5 => "etcd-gogo-xxx",
        _ => return None,
    };
    ETCD_PROFILES.iter().find(|p| p.name == name)
}

/// Identifies a binary's etcd layout (call only for binaries with etcd roles).
pub fn identify(insp: &Inspection) -> EtcdLayout {
    let facts = binary_facts(insp);
    let version = module_version(insp);
    let pair = insp.abi.map(|abi| (insp.arch, abi));
    decide(&facts, version, pair)
}

/// The decision, apart from reading the binary (unit-tested on made-up facts).
pub fn decide(
    facts: &[(Fact, Result<Option<u64>, String>)],
    version: Option<(u32, u32)>,
    pair: Option<(Arch, Abi)>,
) -> EtcdLayout {
    let found: Vec<(Fact, u64)> =
        facts.iter().filter_map(|(f, v)| v.as_ref().ok().copied().flatten().map(|v| (*f, v))).collect();
    let errors: Vec<String> =
        facts.iter().filter_map(|(f, v)| v.as_ref().err().map(|e| format!("{}: {e}", f.describe()))).collect();
    let binary: Vec<(Fact, Option<u64>)> =
        facts.iter().map(|(f, v)| (*f, v.as_ref().ok().copied().flatten())).collect();
    let by_version = version.and_then(profile_for_version);
    let mut out =
        EtcdLayout { profile: None, verified: false, binary, how: String::new(), refusal: None, values: None };

    let matching: Vec<&'static Profile> =
        ETCD_PROFILES.iter().filter(|p| found.iter().all(|(f, v)| p.get(*f) == *v)).collect();
    // The facts that tell the profiles apart must come from the binary for
    // the binary to decide: a binary that only shows offsets both share
    // leaves the choice to the version.
    let decisive = found.iter().any(|(f, _)| {
        let mut vals = ETCD_PROFILES.iter().map(|p| p.get(*f));
        let first = vals.next();
        vals.any(|v| Some(v) != first)
    });
    let chosen: Result<&'static Profile, String> = if !found.is_empty() {
        match matching.as_slice() {
            [] => {
                let mismatch = first_mismatch(&found);
                Err(format!("the binary's own layout is none of the verified ones ({mismatch})"))
            }
            [p] if decisive => {
                out.how = format!("type descriptors in the binary ({} facts found)", found.len());
                match by_version {
                    Some(v) if v.name != p.name => Err(format!(
                        "sources disagree: the type descriptors say {} but module version {}.{} says {}",
                        p.name,
                        version.map(|v| v.0).unwrap_or(0),
                        version.map(|v| v.1).unwrap_or(0),
                        v.name
                    )),
                    _ => Ok(*p),
                }
            }
            _ => match by_version {
                Some(v) if matching.iter().any(|p| p.name == v.name) => {
                    out.how = format!(
                        "module version {}.{} (the {} facts found fit more than one profile)",
                        version.map(|v| v.0).unwrap_or(0),
                        version.map(|v| v.1).unwrap_or(0),
                        found.len()
                    );
                    Ok(v)
                }
                _ => Err(format!(
                    "the facts found in the binary ({}) do not tell the verified layouts apart, and no module version does",
                    found.iter().map(|(f, v)| format!("{} = {v}", f.describe())).collect::<Vec<_>>().join(", ")
                )),
            },
        }
    } else {
        match by_version {
            Some(p) => {
                out.how = format!(
                    "module version {}.{} (no type descriptor of the etcd structs is readable{})",
                    version.map(|v| v.0).unwrap_or(0),
                    version.map(|v| v.1).unwrap_or(0),
                    if errors.is_empty() { String::new() } else { format!(": {}", errors.join("; ")) }
                );
                Ok(p)
            }
            None => Err(format!(
                "layout not identified: no type descriptor of the etcd structs is readable{} and the build records no etcd module version",
                if errors.is_empty() { String::new() } else { format!(" ({})", errors.join("; ")) }
            )),
        }
    };
    match chosen {
        Ok(p) => {
            out.profile = Some(p.name);
            out.values = Some(p.values);
            out.verified = pair.is_some_and(|pair| p.verified_for.contains(&pair));
            if !out.verified {
                out.refusal = Some(format!(
                    "layout {} is verified only on {}, not on {}",
                    p.name,
                    p.verified_for
                        .iter()
                        .map(|(a, b)| format!("{} {}", a.as_str(), b.as_str()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    pair.map(|(a, b)| format!("{} {}", a.as_str(), b.as_str()))
                        .unwrap_or_else(|| "an unknown ABI".into())
                ));
            }
        }
        Err(why) => out.refusal = Some(why),
    }
    out
}

/// The first found fact that every profile disagrees with, for the message.
fn first_mismatch(found: &[(Fact, u64)]) -> String {
    found
        .iter()
        .find(|(f, v)| ETCD_PROFILES.iter().all(|p| p.get(*f) != *v))
        .map(|(f, v)| {
            let known: Vec<String> = ETCD_PROFILES.iter().map(|p| format!("{} in {}", p.get(*f), p.name)).collect();
            format!("{} is {v}, verified: {}", f.describe(), known.join(", "))
        })
        .unwrap_or_else(|| "no single profile fits every fact found".into())
}

/// Whether an inspected component's roles read etcd structs.
pub fn reads_etcd_structs(c: Component) -> bool {
    matches!(c, Component::EtcdServer | Component::EtcdClient)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts_of(p: &Profile) -> Vec<(Fact, Result<Option<u64>, String>)> {
        Fact::ALL.iter().map(|f| (*f, Ok(Some(p.get(*f))))).collect()
    }
    const AMD64: Option<(Arch, Abi)> = Some((Arch::X86_64, Abi::Register));

    #[test]
    fn each_profile_is_recognised_from_its_own_facts() {
        for p in ETCD_PROFILES {
            let l = decide(&facts_of(p), None, AMD64);
            assert_eq!(l.profile, Some(p.name));
            assert!(l.verified && l.refusal.is_none(), "{l:?}");
            assert_eq!(l.get(Fact::EventSize), Some(p.get(Fact::EventSize)));
        }
    }

    #[test]
    fn an_unknown_stride_is_refused_naming_the_fact() {
        let mut f = facts_of(&ETCD_PROFILES[1]);
        f[0].1 = Ok(Some(40));
        let l = decide(&f, None, AMD64);
        assert_eq!(l.get(Fact::EventSize), None);
        let why = l.refusal.unwrap_or_default();
        assert!(why.contains("sizeof(mvccpb.Event) is 40"), "{why}");
    }

    #[test]
    fn binary_and_version_disagreeing_is_refused() {
        // A 3.4 module version on a binary whose structs have the XXX_ fields.
        let l = decide(&facts_of(&ETCD_PROFILES[1]), Some((3, 4)), AMD64);
        assert!(l.refusal.as_deref().is_some_and(|w| w.contains("disagree")), "{l:?}");
        // ... and agreeing is fine.
        let l = decide(&facts_of(&ETCD_PROFILES[1]), Some((3, 5)), AMD64);
        assert_eq!((l.profile, l.refusal), (Some("etcd-gogo-xxx"), None));
    }

    #[test]
    fn no_descriptors_falls_back_to_the_version_and_else_refuses() {
        let none: Vec<_> = Fact::ALL.iter().map(|f| (*f, Ok(None))).collect();
        let l = decide(&none, Some((3, 5)), AMD64);
        assert_eq!(l.profile, Some("etcd-gogo-xxx"));
        assert!(l.how.contains("module version 3.5"));
        let l = decide(&none, None, AMD64);
        assert!(l.refusal.as_deref().is_some_and(|w| w.contains("not identified")), "{l:?}");
        let broken: Vec<_> = Fact::ALL.iter().map(|f| (*f, Err("bad name offset".to_string()))).collect();
        let l = decide(&broken, None, AMD64);
        assert!(l.refusal.as_deref().is_some_and(|w| w.contains("bad name offset")), "{l:?}");
    }

    #[test]
    fn only_shared_offsets_do_not_decide() {
        let mut f: Vec<_> = Fact::ALL.iter().map(|f| (*f, Ok(None))).collect();
        f[2].1 = Ok(Some(32)); // ModRevision: the same in both
        assert!(decide(&f, None, AMD64).refusal.is_some());
        assert_eq!(decide(&f, Some((3, 4)), AMD64).profile, Some("etcd-plain"));
    }

    #[test]
    fn another_abi_is_refused() {
        let l = decide(&facts_of(&ETCD_PROFILES[0]), None, Some((Arch::X86_64, Abi::Stack)));
        assert!(!l.verified);
        assert!(l.refusal.as_deref().is_some_and(|w| w.contains("x86_64 stack")), "{l:?}");
        // The XXX_ layout was measured on bullseye's stack-ABI 3.3.25 too ...
        let l = decide(&facts_of(&ETCD_PROFILES[1]), None, Some((Arch::X86_64, Abi::Stack)));
        assert!(l.verified && l.refusal.is_none(), "{l:?}");
        // ... and on no arm64 build.
        let l = decide(&facts_of(&ETCD_PROFILES[1]), None, Some((Arch::Aarch64, Abi::Register)));
        assert!(l.refusal.is_some(), "{l:?}");
    }
}
