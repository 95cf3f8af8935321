//! Builds the kernel programs (agent-ebpf) for bpfel-unknown-none and leaves
//! the object in OUT_DIR, where `include_bytes_aligned!` embeds it: users run
//! one self-contained binary.
//!
//! The eBPF build needs bpf-linker and rust-src. When they are missing we stop
//! with one line that names the fix, instead of a linker trace.

use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("watchscope");

    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Tools that only need to type-check (docs, IDEs) get an empty object;
        // the agent refuses to start with it and says why.
        if !object.exists() {
            std::fs::write(&object, b"").expect("write placeholder eBPF object");
        }
        return;
    }

    if let Err(missing) = toolchain_present() {
        eprintln!("watchscope: cannot build the eBPF programs: {missing}; run `cargo xtask setup`");
        std::process::exit(1);
    }

    // Stable rustc builds the no_std eBPF crate with -Z build-std=core when
    // RUSTC_BOOTSTRAP=1; aya-build reads the variable from our environment.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_string());
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)) {
        eprintln!("watchscope: building the eBPF programs failed: {e:#}");
        std::process::exit(1);
    }
}

/// Checks for bpf-linker on PATH and rust-src in the active sysroot.
fn toolchain_present() -> Result<(), String> {
    let linker_ok = Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success());
    if !linker_ok {
        return Err("bpf-linker is not on PATH".into());
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot =
        Command::new(rustc).args(["--print", "sysroot"]).output().map_err(|e| format!("cannot run rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let core_src = PathBuf::from(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !core_src.exists() {
        return Err(format!("rust-src is not installed in {sysroot}"));
    }
    Ok(())
}
