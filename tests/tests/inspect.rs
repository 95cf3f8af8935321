//! Ground truth for `watchscope inspect`: fixture binaries built here with
//! Go 1.19 and Go 1.27 (normal, stripped, PIE, cgo with the system linker,
//! arm64), checked against `go tool nm`/`go tool objdump` of their
//! unstripped twins, gdb (DWARF and live registers), and Debian's etcd
//! binaries under real tracefs uprobes.

use std::{
    collections::HashMap,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use watchscope::inspect::{self, Abi, Arch, Cache, Inspection, PclnVersion, Role};
use watchscope_integration_tests::{
    etcd::{Etcd, LineReader},
    go::{self, Fixture, fixture, fixtures, gdb, inspect_json, nm, objdump_rets},
    require_root,
    tracefs::{self, Uprobes},
};

fn lib_inspect(path: &Path) -> Inspection {
    inspect::inspect_path(path).unwrap_or_else(|e| panic!("inspect {}: {e}", path.display()))
}

fn main_module(f: &Fixture) -> &'static str {
    if f.program == "generic" { "watchscope.test/generic" } else { "watchscope.test/fixture" }
}

/// The symbol table the twin (or the binary itself) carries.
fn truth_of(f: &Fixture) -> &Path {
    f.twin.as_deref().unwrap_or(&f.path)
}

#[test]
fn fixture_facts_match_the_build() {
    for f in fixtures() {
        let i = lib_inspect(&f.path);
        let ctx = &f.name;
        assert_eq!(i.go_version.as_deref(), Some(f.toolchain.version.as_str()), "{ctx}");
        assert_eq!(i.arch, if f.goarch == "arm64" { Arch::Aarch64 } else { Arch::X86_64 }, "{ctx}");
        assert_eq!(i.abi, Some(Abi::Register), "{ctx}");
        assert_eq!(i.stripped, f.stripped, "{ctx}");
        assert_eq!(i.pie, f.pie, "{ctx}");
        assert_eq!(i.cgo, f.cgo, "{ctx}");
        assert_eq!(i.external_link, f.cgo, "{ctx}");
        let main = i.build_info.as_ref().and_then(|b| b.main.as_ref()).map(|m| m.path.as_str());
        assert_eq!(main, Some(main_module(f)), "{ctx}");
        let want = if f.toolchain.name == "go1.19" { PclnVersion::Go118 } else { PclnVersion::Go120 };
        assert_eq!(i.pclntab.format, want, "{ctx}");
        // The text start is what `runtime.text` is in the unstripped build:
        // for cgo it is not the .text section start.
        let syms = nm(&f.toolchain, truth_of(f));
        let rt = syms.iter().find(|s| s.name == "runtime.text").expect("runtime.text in nm");
        assert_eq!(i.text_start, rt.address, "{ctx}: text start (from {})", i.text_start_source);
        if f.toolchain.name == "go1.27" {
            // Go 1.26+ leaves pclntab's textStart 0: only the module data knows.
            assert_eq!(i.text_start_source, "runtime module data", "{ctx}");
        }
        assert!(i.moduledata.is_some(), "{ctx}: module data not found");
        eprintln!(
            "{ctx}: text start {:#x} from {}, {} functions",
            i.text_start, i.text_start_source, i.pclntab.functions
        );
    }
}

/// `go tool nm` spells out what Go 1.18-1.19's pclntab abbreviates as
/// `[...]`: array lengths (`type..eq.[5]T`) and generic type arguments.
fn elide_brackets(name: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in name.chars() {
        match c {
            '[' => {
                if depth == 0 {
                    out.push_str("[...");
                }
                depth += 1;
            }
            ']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push(']');
                }
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[test]
fn stripped_functions_match_nm_of_unstripped_twin() {
    let mut summary = Vec::new();
    for f in fixtures() {
        let (code, json, err) = inspect_json(&f.path, &["--functions", "."]);
        assert_eq!(code, 0, "{}: {err}", f.name);
        let funcs = json["functions"].as_array().expect("functions list");
        let syms = nm(&f.toolchain, truth_of(f));
        let mut by_addr: HashMap<u64, Vec<&go::NmSym>> = HashMap::new();
        for s in syms.iter().filter(|s| matches!(s.kind, 'T' | 't')) {
            by_addr.entry(s.address).or_default().push(s);
        }
        let mut mismatches = Vec::new();
        let mut ours = std::collections::HashSet::new();
        for fun in funcs {
            let name = fun["name"].as_str().expect("name");
            let address = fun["address"].as_u64().expect("address");
            let size = fun["size"].as_u64().expect("size");
            ours.insert(address);
            let found = by_addr
                .get(&address)
                .into_iter()
                .flatten()
                .find(|s| s.name == name || s.name == format!("{name}.abi0") || elide_brackets(&s.name) == name);
            match found {
                None => mismatches.push(format!("{name} at {address:#x}: no such symbol in nm")),
                // Linker-made markers (`go:textfipsstart`) have a 1-byte
                // symbol but a pc table covering their alignment block:
                // they are not code anyone probes.
                Some(s) if s.size != size && !name.starts_with("go:") => {
                    mismatches.push(format!("{name} at {address:#x}: size {size}, nm says {}", s.size))
                }
                Some(_) => {}
            }
            // file_offset = vaddr - p_vaddr + p_offset: checked on bytes below.
            assert!(fun["file_offset"].is_u64(), "{}: {name} has no file offset", f.name);
        }
        // The other way: every function nm knows between runtime.text and
        // runtime.etext is in pclntab (cgo's C code lies outside them).
        let at = |n: &str| syms.iter().find(|s| s.name == n).map(|s| s.address).expect(n);
        let (text, etext) = (at("runtime.text"), at("runtime.etext"));
        let missing: Vec<&str> = syms
            .iter()
            .filter(|s| matches!(s.kind, 'T' | 't') && s.size > 0 && (text..etext).contains(&s.address))
            .filter(|s| !ours.contains(&s.address))
            .map(|s| s.name.as_str())
            .collect();
        assert!(mismatches.is_empty(), "{}: {} mismatches:\n{}", f.name, mismatches.len(), mismatches.join("\n"));
        assert!(missing.is_empty(), "{}: nm functions missing from pclntab: {missing:?}", f.name);
        summary.push(format!("{}: {} functions compared, 0 mismatches", f.name, funcs.len()));
    }
    eprintln!("{}", summary.join("\n"));
}

const BASIC_FUNCS: &[&str] = &[
    "main.(*store).notify",
    "main.fixtureClassify",
    "main.fixtureFill",
    "main.goid",
    "main.main",
    "runtime.mapassign",
    "runtime.mapassign_fast64",
    "runtime.mapassign_faststr",
    "runtime.mapaccess2_faststr",
    "runtime.gcAssistAlloc",
];
const CGO_FUNCS: &[&str] =
    &["main.fixtureCgo", "main.main", "runtime.mapassign", "runtime.mapassign_faststr", "runtime.cgocall"];

#[test]
fn return_offsets_match_objdump() {
    let mut compared = 0;
    for f in fixtures().iter().filter(|f| f.stripped) {
        let i = lib_inspect(&f.path);
        let twin = f.twin.as_deref().expect("twin");
        let names = if f.program == "cgo" { CGO_FUNCS } else { BASIC_FUNCS };
        let data = std::fs::read(&f.path).expect("read fixture");
        for name in names {
            // Not every runtime variant is linked into every build.
            if !name.starts_with("main.") && i.function(name).is_none() {
                continue;
            }
            let r = i.resolve(name).unwrap_or_else(|e| panic!("{}: {e}", f.name));
            let want: Vec<u64> =
                objdump_rets(&f.toolchain, twin, name).iter().map(|a| a - r.address + r.file_offset).collect();
            assert!(!want.is_empty(), "{}: objdump shows no RET in {name}", f.name);
            assert_eq!(r.return_offsets, want, "{}: {name}", f.name);
            // And the bytes there are return instructions.
            for &off in &r.return_offsets {
                let b = &data[off as usize..off as usize + 4];
                match i.arch {
                    Arch::X86_64 => assert_eq!(b[0], 0xc3, "{}: {name} at {off:#x}", f.name),
                    Arch::Aarch64 => assert_eq!(
                        u32::from_le_bytes(b.try_into().unwrap()) & 0xffff_fc1f,
                        0xd65f_0000,
                        "{}: {name} at {off:#x}",
                        f.name
                    ),
                }
            }
            compared += 1;
        }
    }
    eprintln!("{compared} functions' return sites equal objdump's RETs");
}

#[test]
fn json_contract() {
    let f = fixture("go1.27-pie-stripped");
    let (code, j, err) = inspect_json(&f.path, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["path"], f.path.display().to_string());
    assert_eq!(j["go_version"], f.toolchain.version);
    assert_eq!(j["arch"], "x86_64");
    assert_eq!(j["abi"], "register");
    assert_eq!(j["stripped"], true);
    assert_eq!(j["pie"], true);
    assert_eq!(j["cgo"], false);
    assert_eq!(j["main_module"]["path"], "watchscope.test/fixture");
    assert!(j["main_module"].get("version").is_some());
    assert!(j["text_start"].is_u64());
    assert!(j.get("functions").is_none(), "functions only with --functions");
    let probes = j["probes"].as_array().expect("probes");
    assert!(!probes.is_empty());
    for p in probes {
        assert!(p["role"].is_string() && p["symbol"].is_string(), "{p}");
        for k in ["address", "file_offset", "size"] {
            assert!(p[k].is_u64(), "{k} in {p}");
        }
        assert!(p["return_offsets"].as_array().expect("return_offsets").iter().all(Value::is_u64));
        assert!(p["args"].is_array());
    }
    let assign: Vec<&Value> = probes.iter().filter(|p| p["role"] == "go_map_assign").collect();
    assert!(assign.iter().any(|p| p["symbol"] == "runtime.mapassign"), "{assign:?}");
    let unresolved = j["unresolved"].as_array().expect("unresolved");
    let notify = unresolved.iter().find(|u| u["role"] == "etcd_server_notify").expect("notify unresolved");
    assert!(notify["reason"].as_str().unwrap().contains("none of"), "{notify}");

    let (code, j, err) = inspect_json(&f.path, &["--functions", r"^main\.fixture"]);
    assert_eq!(code, 0, "{err}");
    let fs = j["functions"].as_array().expect("functions");
    let names: Vec<&str> = fs.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["main.fixtureClassify", "main.fixtureFill"]);
    for f in fs {
        for k in ["address", "file_offset", "size"] {
            assert!(f[k].is_u64(), "{k} in {f}");
        }
    }
}

fn probe<'a>(j: &'a Value, role: &str) -> &'a Value {
    j["probes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["role"] == role))
        .unwrap_or_else(|| panic!("role {role} not resolved: {}", j["unresolved"]))
}

fn read_at(path: &Path, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    std::fs::File::open(path).and_then(|f| f.read_exact_at(&mut b, off)).expect("read");
    b
}

#[test]
fn debian_etcd_resolves_server_roles() {
    let etcd = Path::new("/usr/bin/etcd");
    assert!(etcd.is_file(), "Debian's etcd-server package is not installed");
    let (code, j, err) = inspect_json(etcd, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["go_version"], "go1.19.8");
    assert_eq!((j["stripped"].clone(), j["pie"].clone(), j["cgo"].clone()), (true.into(), false.into(), true.into()));
    assert_eq!(j["main_module"]["path"], "go.etcd.io/etcd");
    assert_eq!(j["main_module"]["version"], Value::Null);
    // pclntab's textStart (and the module data), not the .text section (0x4022e0).
    assert_eq!(j["text_start"], 0x4023e0);
    let notify = probe(&j, "etcd_server_notify");
    assert_eq!(notify["symbol"], "go.etcd.io/etcd/mvcc.(*watchableStore).notify");
    assert_eq!(notify["address"], 0xb0b4c0);
    assert_eq!(notify["file_offset"], 0x70b4c0);
    assert_eq!(read_at(etcd, 0x70b4c0, 4), [0x4c, 0x8d, 0xa4, 0x24]);
    for role in ["etcd_server_notify", "etcd_server_watcher_send", "etcd_server_grpc_send"] {
        let p = probe(&j, role);
        let rets = p["return_offsets"].as_array().unwrap();
        assert!(!rets.is_empty(), "{role}");
        for r in rets {
            assert_eq!(read_at(etcd, r.as_u64().unwrap(), 1), [0xc3], "{role} RET at {r}");
        }
    }
    let m = j["probes"].as_array().unwrap().iter().find(|p| p["symbol"] == "runtime.mapassign_fast64").unwrap();
    assert_eq!(m["file_offset"], 0x14480);
    assert_eq!(read_at(etcd, 0x14480, 4), [0x49, 0x3b, 0x66, 0x10]);
}

#[test]
fn debian_etcdctl_resolves_client_role() {
    let ctl = Path::new("/usr/bin/etcdctl");
    assert!(ctl.is_file(), "Debian's etcd-client package is not installed");
    let (code, j, err) = inspect_json(ctl, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(j["main_module"]["path"], "go.etcd.io/etcd/etcdctl");
    let d = probe(&j, "etcd_client_dispatch");
    assert_eq!(d["symbol"], "go.etcd.io/etcd/clientv3.(*watchGrpcStream).dispatchEvent");
    for r in d["return_offsets"].as_array().unwrap() {
        assert_eq!(read_at(ctl, r.as_u64().unwrap(), 1), [0xc3]);
    }
}

/// A catalog read as a tracefs fetcharg: `name=+16(+0(%bx)):s64`.
fn fetcharg(a: &Value) -> String {
    let s = tracefs::fetch(a);
    let ty = if a["name"].as_str().unwrap().ends_with("_id") && a["name"] != "watch_id" { "x64" } else { "s64" };
    format!("{}={s}:{ty}", a["name"].as_str().unwrap())
}

fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn etcd_arg_reads_match_tracefs() {
    require_root();
    let etcd = Etcd::start("ws-insp-etcd", "ws-insp-ctl");
    let (_, server, err) = inspect_json(&etcd.bin, &[]);
    assert!(server.is_object(), "{err}");
    let (_, client, err) = inspect_json(&etcd.ctl, &[]);
    assert!(client.is_object(), "{err}");

    let mut up = Uprobes::new("wsinsp");
    for (event, json, bin, role) in [
        ("notify", &server, &etcd.bin, "etcd_server_notify"),
        ("wsend", &server, &etcd.bin, "etcd_server_watcher_send"),
        ("gsend", &server, &etcd.bin, "etcd_server_grpc_send"),
        ("dispatch", &client, &etcd.ctl, "etcd_client_dispatch"),
    ] {
        let p = probe(json, role);
        let args: Vec<String> =
            p["args"].as_array().unwrap().iter().filter(|a| a["name"] != "events_ptr").map(fetcharg).collect();
        up.add(event, bin, p["file_offset"].as_u64().unwrap(), &args.join(" "));
    }
    up.enable();

    // Three watchers on one stream: ids 0, 1, 2 in creation order, all
    // registered by etcd before the writes.
    let mut watch = LineReader::new(
        Command::new(&etcd.ctl)
            .args([&format!("--endpoints={}", etcd.endpoint()), "watch", "-i", "-w", "json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl watch -i"),
    );
    let before = etcd.watchers();
    for key in ["a", "b", "c"] {
        watch.send(&format!("watch {key}"));
    }
    etcd.wait_watchers(before + 3, Duration::from_secs(10));
    etcd.put("c", "1");
    etcd.put("b", "1");
    let is_json = |l: &str| serde_json::from_str::<Value>(l).is_ok();
    assert_eq!(watch.wait_count(is_json, 2, Duration::from_secs(10)), 2, "{:?}", watch.lines());
    let text = watch.lines().join("\n");
    let responses: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let header = &responses.first().unwrap_or_else(|| panic!("no watch output: {text}"))["Header"];
    let member = format!("{:#x}", header["member_id"].as_u64().unwrap());
    let cluster = format!("{:#x}", header["cluster_id"].as_u64().unwrap());
    let revs: Vec<i64> = responses.iter().map(|r| r["Header"]["revision"].as_i64().unwrap()).collect();
    assert_eq!(revs.len(), 2, "{text}");
    let trace = up.trace();
    for (rev, wid) in [(revs[0], 2), (revs[1], 1)] {
        let find = |event: &str| -> HashMap<String, String> {
            trace
                .lines()
                .filter(|l| l.contains(&format!(" {event}: ")))
                .map(fields)
                .find(|f| {
                    f.get("rev").or(f.get("revision")) == Some(&rev.to_string())
                        && f.get("events").map(String::as_str) == Some("1")
                })
                .unwrap_or_else(|| panic!("no {event} for revision {rev} in trace:\n{trace}"))
        };
        let n = find("notify");
        assert_eq!(n["rev"], rev.to_string());
        let s = find("wsend");
        assert_eq!(s["watch_id"], wid.to_string(), "{s:?}");
        for event in ["gsend", "dispatch"] {
            let g = find(event);
            assert_eq!(g["watch_id"], wid.to_string(), "{event}: {g:?}");
            assert_eq!(g["member_id"], member, "{event}: {g:?}");
            assert_eq!(g["cluster_id"], cluster, "{event}: {g:?}");
        }
    }
}

fn regex_lite(re: &str) -> watchscope::inspect::Regex {
    watchscope::inspect::Regex::new(re).expect("regex")
}

fn gdb_value(out: &str) -> Vec<i64> {
    out.lines()
        .filter_map(|l| l.strip_prefix('$').and_then(|r| r.split_once(" = ")).and_then(|(_, v)| v.trim().parse().ok()))
        .collect()
}

#[test]
fn goid_offset_matches_dwarf_and_runtime() {
    for t in [go::go119(), go::go127()] {
        for arch in ["basic", "arm64"] {
            let f = fixture(&format!("{}-{arch}", t.name));
            let stripped = lib_inspect(&fixture(&format!("{}-stripped", f.name)).path);
            let goid = stripped.goid.unwrap_or_else(|| panic!("{}: no goid offset", f.name));
            // The compiler's own description of runtime.g.
            let out = gdb(&f.path, &["set language c", "print (long)&(('runtime.g'*)0)->goid"]);
            assert_eq!(gdb_value(&out), [goid.offset as i64], "{}: DWARF says {out}", f.name);
            assert!(goid.verified, "{}", f.name);
            if arch == "basic" {
                // Live: in the main goroutine (goid 1), *(g + offset) with g in R14.
                let entry = stripped.resolve("main.fixtureClassify").expect("fixtureClassify");
                let out = gdb(
                    &f.path,
                    &[
                        "set startup-with-shell off",
                        "set language c",
                        "handle SIGURG nostop noprint pass",
                        &format!("break *{:#x}", entry.address),
                        "run",
                        &format!("print *(long *)($r14 + {})", goid.offset),
                        "kill",
                    ],
                );
                assert_eq!(gdb_value(&out), [1], "{}: live goid read: {out}", f.name);
            }
        }
    }
}

#[test]
fn generic_stream_send_matches_pattern_and_registers() {
    for t in [go::go119(), go::go127()] {
        let f = fixture(&format!("{}-generic", t.name));
        let i = lib_inspect(&f.path);
        if t.name == "go1.19" {
            // Go 1.18-1.19 write `[...]` for type arguments in pclntab: the
            // instantiation cannot be identified, so the role is refused.
            let re = regex_lite("GenericServerStream");
            assert!(
                i.functions_matching(&re)
                    .iter()
                    .any(|f| f.name == "google.golang.org/grpc.(*GenericServerStream[...]).Send")
            );
            assert!(i.probes_for(Role::EtcdServerGrpcSend).next().is_none());
            continue;
        }
        let p =
            i.probes_for(Role::EtcdServerGrpcSend).next().unwrap_or_else(|| panic!("{}: {:?}", f.name, i.unresolved));
        assert!(
            p.symbol.starts_with(
                "google.golang.org/grpc.(*GenericServerStream[go.etcd.io/etcd/api/v3/etcdserverpb.WatchRequest,"
            ),
            "{}",
            p.symbol
        );
        assert!(!p.name_verified);
        // The catalog's reads, evaluated by gdb at the entry: revision 7, watch id 3.
        let expr = |name: &str| -> String {
            let a = p.args.iter().find(|a| a.name == name).expect(name);
            let inspect::ArgSource::Register(r) = a.source else { panic!("{name} not in a register") };
            let mut e = format!("(long)${r}");
            for d in &a.derefs {
                e = format!("*(long *)({e} + {d})");
            }
            format!("print {e}")
        };
        let out = gdb(
            &f.path,
            &[
                "set startup-with-shell off",
                "set language c",
                "handle SIGURG nostop noprint pass",
                &format!("break *{:#x}", p.address),
                "run",
                &expr("revision"),
                &expr("watch_id"),
                "kill",
            ],
        );
        assert_eq!(gdb_value(&out), [7, 3], "{}: {out}", f.name);
    }
}

/// Runs the CLI on a bad file: exit 1, one line naming the file and `want`.
fn assert_one_line_error(path: &Path, want: &str) {
    let out = Command::new(watchscope_integration_tests::watchscope_bin())
        .args(["inspect", "--json"])
        .arg(path)
        .output()
        .expect("run watchscope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {err}", path.display());
    assert!(out.stdout.is_empty(), "{}: printed {:?}", path.display(), String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.lines().count(), 1, "{}: not one line: {err}", path.display());
    let prefix = format!("watchscope: error: {}: ", path.display());
    assert!(err.starts_with(&prefix), "{err}");
    assert!(err.contains(want), "{}: want {want:?} in {err}", path.display());
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // Go 1.19: its pclntab header has a text start, so a bad function range
    // is reported as such (Go 1.27 would refuse earlier: no text start).
    let good = std::fs::read(&fixture("go1.19-basic-stripped").path).unwrap();
    let i = lib_inspect(&fixture("go1.19-basic-stripped").path);
    let t = i.pclntab.file_offset as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let nfunc = u64_at(&good, t + 8) as usize;
    let functab = t + u64_at(&good, t + 8 + 7 * 8) as usize;
    let write = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };

    assert_one_line_error(&write("text.txt", b"hello, world\n"), "not an ELF file");
    assert_one_line_error(&write("empty", b""), "not an ELF file");
    assert_one_line_error(&dir.path().join("missing"), "No such file");
    assert_one_line_error(&write("not-go", &std::fs::read("/bin/true").unwrap()), "not a Go binary");
    assert_one_line_error(&write("head", &good[..200]), "truncated");
    assert_one_line_error(&write("half", &good[..good.len() / 2]), "truncated");
    assert_one_line_error(&write("elf32", &patched(&|b| b[4] = 1)), "32-bit");
    assert_one_line_error(
        &write("bad-magic", &patched(&|b| b[t..t + 4].copy_from_slice(&0xffff_fff7u32.to_le_bytes()))),
        "unknown pclntab magic 0xfffffff7",
    );
    // Entry 0 after entry 1: the table is corrupt.
    assert_one_line_error(
        &write("unsorted", &patched(&|b| b[functab..functab + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes()))),
        "corrupt pclntab",
    );
    // The end of the text far past the executable segment.
    assert_one_line_error(
        &write(
            "outside",
            &patched(&|b| {
                b[functab + 8 * nfunc..functab + 8 * nfunc + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes())
            }),
        ),
        "outside its segment",
    );
    // A function count far larger than the table.
    assert_one_line_error(
        &write("nfunc", &patched(&|b| b[t + 8..t + 16].copy_from_slice(&u64::MAX.to_le_bytes()))),
        "corrupt pclntab",
    );
}

#[test]
fn cache_inspects_each_file_identity_once() {
    let f = fixture("go1.19-basic-stripped");
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&f.path, &link).unwrap();
    let cache = Cache::new();
    let a = cache.inspect(&f.path).unwrap();
    let b = cache.inspect(&link).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "same inode through another path is a hit");
    assert_eq!((cache.stats().hits, cache.stats().misses), (1, 1));
    // A copy is another file; a rewritten file has another mtime.
    let copy = dir.path().join("copy");
    std::fs::copy(&f.path, &copy).unwrap();
    let c = cache.inspect(&copy).unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&copy, std::fs::read(&f.path).unwrap()).unwrap();
    let _ = cache.inspect(&copy).unwrap();
    assert_eq!(cache.stats().misses, 3);
    // Content errors are remembered too; I/O errors are not.
    let txt = dir.path().join("txt");
    std::fs::write(&txt, "x").unwrap();
    assert!(cache.inspect(&txt).is_err());
    assert!(cache.inspect(&txt).is_err());
    assert_eq!(cache.stats().hits, 2);
    assert!(cache.inspect(&dir.path().join("missing")).is_err());
    // Any symbol resolves through the cached inspection.
    let r = a.resolve("main.fixtureClassify").unwrap();
    assert_eq!(Some(r.address), a.function("main.fixtureClassify").map(|f| f.address));
    assert!(matches!(a.resolve("main.noSuchFunction"), Err(inspect::ResolveError::NotFound(_))));
}

#[test]
fn inspect_by_pid() {
    // etcdctl retrying a dead endpoint: a Go process that stays up.
    let mut child = Command::new("/usr/bin/etcdctl")
        .args(["--endpoints=http://127.0.0.1:1", "--dial-timeout=30s", "watch", "x"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl");
    // spawn() returns once the exec succeeded: /proc/<pid>/exe is etcdctl.
    let out = Command::new(watchscope_integration_tests::watchscope_bin())
        .args(["inspect", "--json", "--pid", &child.id().to_string()])
        .output()
        .expect("watchscope");
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["main_module"]["path"], "go.etcd.io/etcd/etcdctl");
    probe(&j, "etcd_client_dispatch");
}
