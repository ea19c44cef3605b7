//! Memory bounds (README "Memory"): what a node holds for its peers stays within its
//! documented budgets, whatever the values' sizes and however slow a peer is.

mod common;
use common::*;

/// Resident memory of a process, in bytes (Linux).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Writes per writer thread.
const WRITES: usize = 20;

#[test]
fn a_paused_peer_costs_a_bounded_amount_of_memory() {
    let d = Dirs::new();
    let (n1, n2) = two(&d, "durability: buffer");
    let base = rss(n1.pid());
    // n2 stops answering: every push to it waits for its timeout, and n1 queues.
    signal(n2.pid(), "STOP");
    let _resume = Resume(n2.pid());
    // 16 writers, 1 MiB values: 320 MiB of writes in a few seconds.
    let value = std::sync::Arc::new(format!("\"{}\"", "m".repeat(1_000_000)));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let peak_queued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (peak, peak_queued, done, pid, addr) =
            (peak.clone(), peak_queued.clone(), done.clone(), n1.pid(), n1.addr.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                let metrics = http(&addr, "GET", "/metrics", None).text();
                let queued = metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("kvs_push_queue_bytes "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("kvs_push_queue_bytes");
                peak_queued.fetch_max(queued, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (addr, value) = (n1.addr.clone(), value.clone());
            std::thread::spawn(move || {
                for i in 0..WRITES {
                    let r = http(&addr, "PUT", &format!("/kv/big/{w}/{i}"), Some(value.as_bytes()));
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            })
        })
        .collect();
    writers.into_iter().for_each(|w| w.join().unwrap());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    let grew = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(base);
    let queued = peak_queued.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("n1: push queues peaked at {} MiB; RSS grew {} MiB over {} MiB", queued >> 20, grew >> 20, base >> 20);
    // What n1 holds for its paused peer stays within the push budgets, however much
    // is written (320 MiB here).
    let budget = (kvs::push::QUEUE_BYTES + kvs::push::PEER_QUEUE_BYTES) as u64;
    assert!(queued <= budget, "push queues held {queued} bytes, over the {budget}-byte budget");
    assert!(queued >= budget / 4, "the test must fill the queues to mean anything ({queued} bytes)");
    // The whole process stays within what README "Memory" adds up for this load:
    // the push budgets, fjall's memtables (twice its write buffer) and block cache,
    // the bodies in flight (16 clients, a few copies of each 1 MiB value on the way
    // to storage), and 64 MiB for the runtime, threads and the allocator. Before the
    // byte bounds, the queues alone held every value written (320 MiB here).
    const MIB: u64 = 1024 * 1024;
    let in_flight = 16 * 4 * MIB;
    let bound = budget + 2 * kvs::storage::WRITE_BUFFER_BYTES + kvs::storage::CACHE_BYTES + in_flight + 64 * MIB;
    assert!(grew <= bound, "RSS grew {} MiB, over the {} MiB this load may use", grew >> 20, bound >> 20);
    let metrics = n1.get("/metrics").text();
    assert!(
        metrics.lines().any(|l| l.starts_with("kvs_push_dropped_records_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Once n2 is back, sync repairs what the pushes dropped.
    drop(_resume);
    wait_for(std::time::Duration::from_secs(60), "n2 holds every value", || {
        (n2.health()["keys"] == 16 * WRITES).then_some(())
    });
}

/// Resumes a stopped process when dropped, even if the test fails.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg("-CONT").arg(self.0.to_string()).status();
    }
}
