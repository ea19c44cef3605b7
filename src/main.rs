//! The `kvs` daemon: `kvs [CONFIG_PATH]`. Reads (or creates) the config, sets up
//! logging and runs one node until SIGINT/SIGTERM.

use kvs::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: kvs [CONFIG_PATH]   (default: config.yaml; created with defaults when missing)\n       kvs keygen        (print a new cluster key for cluster_key_file)";

/// jemalloc instead of glibc's malloc: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let path = match (args.next(), args.next()) {
        (None, _) => PathBuf::from("config.yaml"),
        (Some(a), None) if a == "-h" || a == "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        (Some(a), None) if a == "keygen" => {
            // A new cluster key, for cluster_key_file (README "Security").
            println!("{}", kvs::auth::ClusterKeys::generate());
            return ExitCode::SUCCESS;
        }
        (Some(a), None) if a == "-V" || a == "--version" => {
            println!("kvs {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        (Some(a), None) if !a.to_string_lossy().starts_with('-') => PathBuf::from(a),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (config, created) = match Config::load_or_create(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvs: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = kvs::clock::check_fault_offset() {
        eprintln!("kvs: {e}");
        return ExitCode::from(2);
    }
    let level = match kvs::config::effective_log_level(config.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kvs: {e}");
            return ExitCode::from(2);
        }
    };
    let builder = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(kvs::config::log_filter(level))
        .with_writer(std::io::stdout)
        .with_filter_reloading();
    let reload = builder.reload_handle();
    builder.init();
    let set_level: kvs::node::SetLogLevel = Box::new(move |l| {
        if let Err(e) = reload.reload(kvs::config::log_filter(l)) {
            tracing::error!(error = %e, "cannot change the log level");
        }
    });
    if created {
        tracing::info!(path = %path.display(), "config file not found; wrote the default");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvs: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(kvs::node::run(config, path, set_level));
    // A blocking task stuck on a hung disk must not keep the process from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "kvs stopped");
            eprintln!("kvs: {e}");
            ExitCode::FAILURE
        }
    }
}
