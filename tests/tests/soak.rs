//! The soak's short form (`cargo xtask soak` runs the long one): etcd
//! under puts from three writers, each put its own watched `etcdctl`
//! process (an exec and an exit per put), and 20 watches on 4 streams.
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
    let cfg = SoakConfig { seconds: 10, streams: 4, watches_per_stream: 5, writers: 3 };
    let r = soak::run(cfg, "wse-soak", "wsc-soak");
    eprintln!("{r:#?}");
    let watches = r.watches(&cfg);
    assert!(r.puts >= 100, "only {} puts in {:.0} s", r.puts, r.seconds);
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
