//! kvs-conflict: make timestamp collisions on purpose, in the data dirs of stopped nodes.
//!
//! ```text
//! kvs-conflict --key test/conflict --timestamp 1700000000000 [--count N] DIR=JSON...
//! ```
//! Each `DIR=JSON` writes that value for the key into the data dir `DIR` with the given
//! timestamp (Unix ms, stored as the HLC of that millisecond with counter 0), replacing what the key held there. Arguments with the same JSON get the
//! same uuid (one version held by several nodes); different JSON, different uuids: a
//! collision. With `--count N` the keys are `KEY/0` to `KEY/N-1`.

use bytes::Bytes;
use kvs::config::{DEFAULT_MAX_CLOCK_OFFSET_MS, Durability};
use kvs::record::Record;
use kvs::storage::Store;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use uuid::Uuid;

const USAGE: &str = "usage: kvs-conflict --key KEY --timestamp MS [--count N] DIR=JSON [DIR=JSON...]";

struct Args {
    key: String,
    timestamp: u64,
    count: Option<usize>,
    writes: Vec<(PathBuf, String)>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut key, mut timestamp, mut count, mut writes) = (None, None, None, Vec::new());
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--key" => key = Some(value("--key")?),
            "--timestamp" => {
                timestamp = Some(value("--timestamp")?.parse().map_err(|_| "--timestamp must be Unix milliseconds")?)
            }
            "--count" => {
                count = Some(
                    value("--count")?
                        .parse()
                        .ok()
                        .filter(|n| (1..=1_000_000).contains(n))
                        .ok_or("--count must be 1 to 1000000")?,
                )
            }
            "-h" | "--help" => return Err(String::new()),
            _ => match a.split_once('=') {
                Some((dir, json)) if !dir.is_empty() && !dir.starts_with('-') => {
                    kvs::api::validate_json(json.as_bytes())
                        .map_err(|e| format!("{dir}: value is not valid JSON: {e}"))?;
                    writes.push((PathBuf::from(dir), json.to_string()));
                }
                _ => return Err(format!("unexpected argument {a:?}")),
            },
        }
    }
    let key = key.ok_or("--key is required")?;
    kvs::path::validate_key(&key).map_err(|e| format!("--key: {e}"))?;
    let timestamp = timestamp.ok_or("--timestamp is required")?;
    if writes.is_empty() {
        return Err("name at least one DIR=JSON".into());
    }
    Ok(Args { key, timestamp, count, writes })
}

async fn write(args: Args) -> Result<(), String> {
    let keys: Vec<String> = match args.count {
        Some(n) => (0..n).map(|i| format!("{}/{i}", args.key)).collect(),
        None => vec![args.key.clone()],
    };
    let mut uuids: HashMap<&str, Uuid> = HashMap::new();
    for (dir, json) in &args.writes {
        let uuid = *uuids.entry(json.as_str()).or_insert_with(Uuid::new_v4);
        let d = dir.clone();
        let (store, writer) =
            tokio::task::spawn_blocking(move || Store::open(&d, Durability::Sync, DEFAULT_MAX_CLOCK_OFFSET_MS))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{}: {e} (stop its node first)", dir.display()))?;
        let record = Record::value(kvs::hlc::from_ms(args.timestamp), uuid, Bytes::from(json.clone()));
        for k in &keys {
            writer.replace(k.clone(), record.clone(), None).await.map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        tokio::task::spawn_blocking(move || writer.close(&store))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        println!("{}: {} key(s) = {json} (uuid {uuid}, timestamp {})", dir.display(), keys.len(), args.timestamp);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kvs-conflict: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvs-conflict: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(write(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvs-conflict: {e}");
            ExitCode::FAILURE
        }
    }
}
