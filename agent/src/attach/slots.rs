//! Label slots: the kernel keeps histograms in fixed arrays indexed by a
//! small slot number per label set (today the process's comm; pod and
//! namespace later). Slots are handed out on first sight and never reused,
//! so a series never changes meaning; past the cap every new label set
//! shares the overflow slot (exported as `comm="_other"`) and is counted.

use std::collections::HashMap;

use agent_common::watch::{MAX_SLOTS, OVERFLOW_SLOT};

pub const OVERFLOW_LABEL: &str = "_other";

#[derive(Debug)]
pub struct Slots {
    by_label: HashMap<String, u32>,
    labels: Vec<String>,
    max: u32,
    /// Label sets that did not get a slot of their own.
    pub overflowed: u64,
}

impl Default for Slots {
    fn default() -> Self {
        Self::with_capacity(MAX_SLOTS)
    }
}

impl Slots {
    /// A table of `max` slots (the size of the kernel arrays it indexes).
    pub fn with_capacity(max: u32) -> Self {
        Self { by_label: HashMap::new(), labels: vec![OVERFLOW_LABEL.to_string()], max, overflowed: 0 }
    }

    /// The slot for `label`, allocating one if there is room.
    pub fn slot(&mut self, label: &str) -> u32 {
        if let Some(s) = self.by_label.get(label) {
            return *s;
        }
        if self.labels.len() as u32 >= self.max {
            self.overflowed += 1;
            return OVERFLOW_SLOT;
        }
        let s = self.labels.len() as u32;
        self.labels.push(label.to_string());
        self.by_label.insert(label.to_string(), s);
        s
    }

    /// (slot, label) for every slot handed out, overflow first.
    pub fn all(&self) -> impl Iterator<Item = (u32, &str)> {
        self.labels.iter().enumerate().map(|(i, l)| (i as u32, l.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_capped() {
        let mut s = Slots::default();
        let a = s.slot("etcd");
        assert_eq!(a, 1);
        assert_eq!(s.slot("etcdctl"), 2);
        assert_eq!(s.slot("etcd"), a);
        for i in 0..MAX_SLOTS {
            s.slot(&format!("p{i}"));
        }
        assert_eq!(s.slot("late"), OVERFLOW_SLOT);
        assert!(s.overflowed > 0);
        assert_eq!(s.all().count() as u32, MAX_SLOTS);
    }
}
