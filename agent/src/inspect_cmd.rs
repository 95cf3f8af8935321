//! `watchscope inspect`: the CLI side of the inspector (printing, exit codes).

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::Args;
use watchscope::inspect::{self, ArgRead, ArgSource, Inspection, StructLayout, TypeError, layout::EtcdLayout};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The binary to inspect.
    #[arg(required_unless_present = "pid", conflicts_with = "pid")]
    pub path: Option<PathBuf>,
    /// Inspect the executable of this running process (/proc/PID/exe).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Print JSON (the contract other tools and the tests use).
    #[arg(long)]
    pub json: bool,
    /// Also list the functions whose names match this regular expression.
    #[arg(long)]
    pub functions: Option<String>,
    /// Print the layout of this struct type, as Go names it (`mvccpb.Event`),
    /// read from the binary's type descriptors. Repeatable.
    #[arg(long = "type", value_name = "NAME")]
    pub types: Vec<String>,
    /// With --type: only types of the package with this import path.
    #[arg(long, value_name = "PATH", requires = "types")]
    pub type_pkg: Option<String>,
}

pub fn run(args: InspectArgs) -> Result<ExitCode> {
    let path = match (&args.path, args.pid) {
        (Some(p), _) => p.clone(),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/exe")),
        (None, None) => anyhow::bail!("give a PATH or --pid"),
    };
    let functions = args
        .functions
        .as_deref()
        .map(|re| {
            // regex errors span lines (a caret under the pattern): keep one.
            regex::Regex::new(re).map_err(|e| {
                let why = e.to_string().lines().last().unwrap_or_default().trim().to_string();
                anyhow::anyhow!("--functions {re:?}: invalid regular expression ({why})")
            })
        })
        .transpose()?;
    // The error already names the file; main prints it on one line.
    let insp = inspect::inspect_path(&path)?;
    let layouts: Vec<(&str, Result<StructLayout, TypeError>)> =
        args.types.iter().map(|t| (t.as_str(), insp.struct_layout_in(t, args.type_pkg.as_deref()))).collect();
    if args.json {
        let mut v = serde_json::to_value(insp.report(functions.as_ref()))?;
        if !layouts.is_empty()
            && let Some(o) = v.as_object_mut()
        {
            let items = layouts
                .iter()
                .map(|(name, r)| match r {
                    Ok(l) => serde_json::to_value(l),
                    Err(e) => Ok(serde_json::json!({ "name": name, "error": e.to_string() })),
                })
                .collect::<Result<Vec<_>, _>>()?;
            o.insert("struct_layouts".into(), serde_json::Value::Array(items));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", human(&insp, functions.as_ref()));
        for (name, r) in &layouts {
            print!("{}", layout_text(name, r));
        }
    }
    // A type asked for and not read is a failure scripts must see.
    Ok(if layouts.iter().any(|(_, r)| r.is_err()) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn layout_text(name: &str, r: &Result<StructLayout, TypeError>) -> String {
    let mut o = String::new();
    match r {
        Ok(l) => {
            let _ = writeln!(
                o,
                "\nstruct {} ({}): size {}, align {}, {} fields",
                l.name,
                l.pkg_path.as_deref().unwrap_or("no package path"),
                l.size,
                l.align,
                l.fields.len()
            );
            for f in &l.fields {
                let emb = if f.embedded { " (embedded)" } else { "" };
                let _ = writeln!(o, "  {:>6} {:>6}  {} {}{emb}", f.offset, f.size, f.name, f.type_name);
            }
        }
        Err(e) => {
            let _ = writeln!(o, "\nstruct {name}: {e}");
        }
    }
    o
}

fn human(insp: &Inspection, functions: Option<&regex::Regex>) -> String {
    let mut o = String::new();
    let yn = |b: bool, yes: &'static str, no: &'static str| if b { yes } else { no };
    let _ = writeln!(
        o,
        "{}: {}, {}, {} ABI, {}, {}, {}{}",
        insp.path.display(),
        insp.go_version.as_deref().unwrap_or("Go version unknown"),
        insp.arch,
        insp.abi.map_or("unknown", |a| a.as_str()),
        yn(insp.stripped, "stripped", "not stripped"),
        yn(insp.pie, "PIE", "not PIE"),
        yn(insp.cgo, "cgo", "no cgo"),
        yn(insp.external_link, ", external link", ""),
    );
    if let Some(b) = &insp.build_info {
        let main = b.main.as_ref();
        let path = main.map(|m| m.path.as_str()).or(b.path.as_deref()).unwrap_or("?");
        let version = main.and_then(|m| m.version.as_deref()).unwrap_or("no version");
        let _ = writeln!(o, "  main module: {path} {version} ({} deps)", b.deps.len());
        if !b.settings.is_empty() {
            let s: Vec<String> = b.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(o, "  build: {}", s.join(" "));
        }
    }
    let t = &insp.pclntab;
    let _ = writeln!(
        o,
        "  pclntab: {} format (magic {:#010x}) at {:#x} (file {:#x}), {} functions, found by {}",
        t.format.describe(),
        t.magic,
        t.address,
        t.file_offset,
        t.functions,
        t.found_by
    );
    let _ = writeln!(o, "  text start: {:#x} (from {})", insp.text_start, insp.text_start_source);
    match insp.goid {
        Some(g) => {
            let _ = writeln!(
                o,
                "  goid: offset {} in runtime.g ({}){}",
                g.offset,
                if g.verified { "verified" } else { "reported, unverified" },
                insp.g_register.map(|r| format!(", g in {r}")).unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(o, "  goid: offset unknown");
        }
    }
    let _ = writeln!(o, "\nresolved roles ({}):", insp.probes.len());
    for p in &insp.probes {
        let _ = writeln!(o, "  {:<26} {}", p.role, p.symbol);
        let rets: Vec<String> = p.return_offsets.iter().map(|r| format!("{r:#x}")).collect();
        let _ = writeln!(
            o,
            "  {:<26} address {:#x}, file offset {:#x}, size {}, returns at [{}]",
            "",
            p.address,
            p.file_offset,
            p.size,
            rets.join(", ")
        );
        if !p.args.is_empty() {
            let a: Vec<String> = p.args.iter().map(arg).collect();
            let _ = writeln!(o, "  {:<26} args: {}", "", a.join(", "));
        }
        if let Some(n) = &p.args_note {
            let _ = writeln!(o, "  {:<26} ({n})", "");
        }
    }
    if let Some(l) = &insp.etcd_layout {
        o.push_str(&etcd_layout_text(l));
    }
    if let Some(text) = apiserver_layout_text(insp) {
        o.push_str(&text);
    }
    let _ = writeln!(o, "\nunresolved roles ({}):", insp.unresolved.len());
    for u in &insp.unresolved {
        let _ = writeln!(o, "  {:<26} {}", u.role, u.reason);
    }
    if !insp.notes.is_empty() {
        let _ = writeln!(o, "\nnotes:");
        for n in &insp.notes {
            let _ = writeln!(o, "  {n}");
        }
    }
    if let Some(re) = functions {
        let fs = insp.functions_matching(re);
        let _ = writeln!(o, "\nfunctions matching {:?} ({}):", re.as_str(), fs.len());
        for f in fs {
            let off = f.file_offset.map_or_else(|| "-".to_string(), |x| format!("{x:#x}"));
            let _ = writeln!(o, "  {:#x} {off:>10} {:>7} {}", f.address, f.size, f.name);
        }
    }
    o
}

/// What the API server's watch-cache roles read, for a binary that has
/// them: the event struct's offsets from its type descriptor, or why the
/// roles are refused.
fn apiserver_layout_text(insp: &Inspection) -> Option<String> {
    use watchscope::inspect::Role;
    let kube = [Role::KubeCacheProcessEvent, Role::KubeWatcherQueue, Role::KubeWatcherSent];
    if !kube.iter().any(|r| insp.probes_for(*r).next().is_some()) {
        return None;
    }
    let mut text = match watchscope::attach::watch::cache_event_layout(insp) {
        Ok((ty, rv)) => format!(
            "\nAPI server watch-cache layout (the apiserver_* roles read it): from the binary's type descriptor\n  \
             cacher.watchCacheEvent.Type                {ty:>4}\n  cacher.watchCacheEvent.ResourceVersion     {rv:>4}\n"
        ),
        Err(why) => {
            return Some(format!("\nAPI server watch-cache layout\n  REFUSED: {why}; no apiserver role is attached\n"));
        }
    };
    // The watch handler's writes join by the dispatched object.
    text += &match watchscope::attach::watch::cache_event_objects(insp) {
        Ok((obj, prev)) => format!(
            "  cacher.watchCacheEvent.Object              {obj:>4}\n  cacher.watchCacheEvent.PrevObject          {prev:>4}\n"
        ),
        Err(why) => format!("  REFUSED for the watch handler's writes: {why}\n"),
    };
    Some(text)
}

/// The etcd layout the watch roles read: which profile, how it was chosen,
/// and where each fact came from; or why the roles are refused.
fn etcd_layout_text(l: &EtcdLayout) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\netcd struct layout (every etcd role reads it): {}{}",
        l.profile.unwrap_or("none"),
        if l.how.is_empty() { String::new() } else { format!(", chosen by {}", l.how) }
    );
    match &l.refusal {
        Some(why) => {
            let _ = writeln!(o, "  REFUSED: {why}; no etcd role is attached");
        }
        None => {
            let _ = writeln!(o, "  verified for this architecture and ABI");
        }
    }
    for (fact, value) in &l.binary {
        let from = match (value, l.get(*fact)) {
            (Some(v), _) => format!("{v:>4}  type descriptor"),
            (None, Some(v)) => format!("{v:>4}  profile (not in the binary's type descriptors)"),
            (None, None) => "   -  not in the binary".to_string(),
        };
        let _ = writeln!(o, "  {:<44} {from}", fact.describe());
    }
    o
}

fn arg(a: &ArgRead) -> String {
    let mut s = match a.source {
        ArgSource::Register(r) => r.to_string(),
        ArgSource::Stack(off) => format!("sp+{off}"),
    };
    for d in &a.derefs {
        s = format!("*({s}+{d})");
    }
    format!("{}={s}{}", a.name, if a.verified { "" } else { " (unverified)" })
}
