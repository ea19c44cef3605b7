//! A gossip message from a peer: parsing and checking never panic, and no entry that
//! passes the checks carries a version no later news could beat.
#![no_main]
use libfuzzer_sys::fuzz_target;

const WALL: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = serde_json::from_slice::<kvs::cluster::GossipMessage>(data) else { return };
    for m in &msg.members {
        if kvs::membership::check_info(m, WALL).is_ok() {
            assert!(m.incarnation <= WALL + kvs::membership::MAX_AHEAD_MS);
            assert!(m.heartbeat <= kvs::membership::MAX_HEARTBEAT);
            assert!(!m.id.is_empty() && !m.uid.is_empty());
        }
    }
});
