//! Process discovery: every exec on the node, sent to user space, which
//! decides what to inspect and attach to. Exec is rare (at most thousands per
//! second on a busy node), so a ring buffer event per exec is affordable.

use agent_common::{
    Counter, ExecEvent,
    counters::Ring,
    events::{COMM_LEN, EVENT_EXEC, EVENT_EXIT, EXEC_FILENAME_LEN, ExitEvent},
};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{EVENTS, PROC_SLOT, count, note_fill, proc_slot_changed};

/// Offsets into the sched_process_exec record, read from tracefs' `format`
/// file by user space at load time (they have been stable for years, but the
/// format file is the contract, so we do not hard-code them). The defaults
/// are the x86_64 values of kernels 4.x–6.x.
#[unsafe(no_mangle)]
static EXEC_FILENAME_LOC_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static EXEC_OLD_PID_OFFSET: u32 = 16;

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    count(Counter::ExecSeen);
    let _ = try_sched_process_exec(&ctx);
    0
}

#[inline(always)]
fn try_sched_process_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count(Counter::EventsRingbufFull);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points into a reserved ring buffer slot of the right size;
    // every field is written before submit.
    unsafe {
        (*ev).kind = EVENT_EXEC;
        (*ev)._pad = 0;
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let loc_off = core::ptr::read_volatile(&EXEC_FILENAME_LOC_OFFSET) as usize;
        let pid_off = core::ptr::read_volatile(&EXEC_OLD_PID_OFFSET) as usize;
        (*ev).old_pid = ctx.read_at::<u32>(pid_off).unwrap_or(0);
        (*ev).comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
        // __data_loc: low 16 bits are the offset of the string from the start
        // of the record, high 16 bits its length.
        let loc = ctx.read_at::<u32>(loc_off).unwrap_or(0);
        let str_off = (loc & 0xffff) as usize;
        let filename = &mut (*ev).filename;
        filename[0] = 0;
        if str_off != 0 {
            let src = (ctx.as_ptr() as *const u8).add(str_off);
            let _ = bpf_probe_read_kernel_str_bytes(src, &mut filename[..EXEC_FILENAME_LEN]);
        }
    }
    entry.submit(0);
    note_fill(&EVENTS, Ring::Events);
    Ok(())
}

/// A thread exits. Only the exit of a watched thread-group leader matters:
/// its per-process slot is cleared here, in the kernel, so a reused pid never
/// inherits it, and user space is told so it can release probes.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Cheapest test first: most exits are of unwatched processes' threads.
    if pid_tgid as u32 != tgid {
        return 0;
    }
    // SAFETY: map lookup of a plain key.
    if unsafe { PROC_SLOT.get(tgid) }.is_none() {
        return 0;
    }
    let _ = PROC_SLOT.remove(tgid);
    proc_slot_changed();
    match EVENTS.reserve::<ExitEvent>(0) {
        Some(mut entry) => {
            entry.write(ExitEvent { kind: EVENT_EXIT, tgid, ktime_ns: unsafe { bpf_ktime_get_ns() } });
            entry.submit(0);
            note_fill(&EVENTS, Ring::Events);
        }
        None => count(Counter::ExitRingbufFull),
    }
    0
}
