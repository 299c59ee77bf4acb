//! `ollamacron-sim`: N real node cores in one process over the latency
//! transport; measures convergence, lookups, DHT requests, idle traffic,
//! how fast a new service spreads, heap per node, and (with `--churn`)
//! how fast crashed nodes' services leave the answers. `cargo xtask sim`
//! builds it in release and runs it.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod plan;
mod report;
mod run;

use std::alloc::System;
use std::process::ExitCode;

use clap::Parser;

/// Every allocation is counted: the live heap is `ALLOCATOR.allocated()`.
#[global_allocator]
static ALLOCATOR: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

/// Bytes on the heap right now.
pub(crate) fn heap_bytes() -> usize {
    ALLOCATOR.allocated()
}

fn main() -> ExitCode {
    let args = args::Args::parse();
    if let Err(e) = args.check() {
        eprintln!("ollamacron-sim: {e:#}");
        return ExitCode::from(2);
    }
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ollamacron-sim: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run::run(&args));
    let code = match outcome {
        Ok(report) => {
            let failed = !report.failures.is_empty();
            report.print();
            match report.write_json(&args.json_path()) {
                Ok(path) => println!("wrote {}", path.display()),
                Err(e) => {
                    eprintln!("ollamacron-sim: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
            if failed {
                eprintln!("ollamacron-sim: not everything happened in time:");
                for failure in &report.failures {
                    eprintln!("  - {failure}");
                }
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("ollamacron-sim: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Nodes still winding down are not waited for.
    runtime.shutdown_background();
    code
}

/// Node logs go to stderr when `RUST_LOG` asks for them (quiet by
/// default: a thousand nodes' info lines would drown the progress).
fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
}
