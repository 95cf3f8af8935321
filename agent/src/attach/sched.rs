//! The kernel-side half of window scheduling time: raw tracepoint programs
//! on `sched_switch` and `sched_wakeup` (agent-ebpf `gosched.rs`, which says
//! why raw). They run on every context switch of the node, so they are
//! attached only while some binary has window probes, and detached when
//! none is left.

use aya::{
    Ebpf,
    programs::{RawTracePoint, raw_trace_point::RawTracePointLinkId},
};
use thiserror::Error;

use super::TracepointSpec;

pub const SCHED_TRACEPOINTS: &[TracepointSpec] = &[
    TracepointSpec { program: "go_sched_switch", category: "sched", name: "sched_switch" },
    TracepointSpec { program: "go_sched_wakeup", category: "sched", name: "sched_wakeup" },
];

#[derive(Debug, Error)]
pub enum SchedError {
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{program} on {category}:{name}: {source}")]
    Program {
        program: &'static str,
        category: &'static str,
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

#[derive(Default)]
pub struct SchedProbes {
    links: Vec<(&'static str, RawTracePointLinkId)>,
}

impl SchedProbes {
    /// Loads (but does not attach) the programs: a verifier problem shows at start.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, SchedError> {
        for spec in SCHED_TRACEPOINTS {
            program(ebpf, spec)?.load().map_err(|e| err(spec, e))?;
        }
        Ok(Self::default())
    }

    pub fn attached(&self) -> usize {
        self.links.len()
    }

    /// Attaches both programs unless they are attached already.
    pub fn ensure(&mut self, ebpf: &mut Ebpf) -> Result<(), SchedError> {
        if !self.links.is_empty() {
            return Ok(());
        }
        for spec in SCHED_TRACEPOINTS {
            match program(ebpf, spec).and_then(|p| p.attach(spec.name).map_err(|e| err(spec, e))) {
                Ok(link) => self.links.push((spec.program, link)),
                Err(e) => {
                    self.detach(ebpf);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    pub fn detach(&mut self, ebpf: &mut Ebpf) {
        for (name, link) in self.links.drain(..) {
            if let Some(Ok(p)) = ebpf.program_mut(name).map(<&mut RawTracePoint>::try_from)
                && let Err(e) = p.detach(link)
            {
                tracing::warn!("detaching {name}: {e}");
            }
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, spec: &TracepointSpec) -> Result<&'a mut RawTracePoint, SchedError> {
    ebpf.program_mut(spec.program)
        .and_then(|p| <&mut RawTracePoint>::try_from(p).ok())
        .ok_or(SchedError::MissingProgram(spec.program))
}

fn err(spec: &TracepointSpec, source: aya::programs::ProgramError) -> SchedError {
    SchedError::Program { program: spec.program, category: spec.category, name: spec.name, source: Box::new(source) }
}
