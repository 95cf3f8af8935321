//! The kernel BTF reader: a file it reads is trusted to be the kernel's,
//! but a broken one must still be an error, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use watchscope_fuzz::btf::Btf;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::parse(data.to_vec()) {
        for (s, m) in [("sock_common", "skc_v6_daddr"), ("sock", "__sk_common"), ("outer", "c")] {
            let _ = btf.member(s, m);
            let _ = btf.member_sized(s, m, 16);
        }
    }
});
