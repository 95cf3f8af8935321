//! The soak's short form (`cargo xtask soak` runs the long one): etcd
//! under puts from three writers, each put its own watched `etcdctl`
//! process (an exec and an exit per put), 20 watches on 5 streams, and 200
//! other watched processes starting and exiting per second in a pod whose
//! kubelet never answers.
//! Every family is accounted for exactly against counts the agent has no
//! part in: etcd's own revision counter, what each watcher printed, the
//! processes the soak started.

use watchscope_integration_tests::{
    require_root,
    soak::{self, SoakConfig},
};

#[test]
fn a_short_soak_accounts_for_every_event_and_exec_exactly() {
    require_root();
    let cfg = SoakConfig {
        seconds: 10,
        // Five streams of four: watch ids are only unique per stream, so
        // five watches share each id, one more than a ring set's ways.
        streams: 5,
        watches_per_stream: 4,
        writers: 3,
        execs_per_second: 200,
        stalled_kubelet: true,
    };
    let r = soak::run(cfg, "wse-soak", "wsc-soak");
    eprintln!("{r:#?}");
    let watches = r.watches(&cfg);
    assert!(r.puts >= 100, "only {} puts in {:.0} s", r.puts, r.seconds);
    // The paced processes kept their rate (within a tenth: a loaded
    // machine's spawns are slower, and the pacing catches up).
    let rate = r.churn_execs as f64 / r.seconds;
    assert!(rate >= 0.9 * f64::from(cfg.execs_per_second), "{rate:.0} paced execs/s");
    assert_eq!(r.execs, r.puts, "every put succeeded");
    assert_eq!(r.received, r.puts * watches, "every watch printed every put");
    // The agent: one send per event and watch on the server, one dispatch
    // per event and watch on the clients, one exec per put process, each
    // event timed at every stage; at this size nothing is dropped.
    for (check, ok) in r.checks(&cfg) {
        assert!(ok, "{check}: {r:#?}");
    }
    assert!(r.dropped.is_empty(), "nothing dropped: {:?}", r.dropped);
    // The rings never came near full.
    for (ring, high) in &r.ring_high_water {
        assert!(*high < f64::from(256u32 * 1024) / 2.0, "{ring}: {high} bytes waiting at most");
    }
}
