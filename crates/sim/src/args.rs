//! The command line of `ollamacron-sim` (and of `cargo xtask sim`).

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use ollamacron_node_core::config::{ConfigLoader, NodeConfig};

/// Run N node cores in one process over in-memory links with latency.
#[derive(Debug, Parser)]
#[command(name = "ollamacron-sim", about, long_about = None)]
pub(crate) struct Args {
    /// Number of nodes.
    #[arg(long)]
    pub(crate) nodes: usize,
    /// Range of link round trips in milliseconds, `MIN..MAX` (each link's
    /// drawn once, uniformly, with the seed).
    #[arg(long, default_value = "20..80", value_parser = parse_rtt)]
    pub(crate) rtt: RangeInclusive<Duration>,
    /// Crash this percentage of the nodes after the other measurements
    /// and time until no survivor's lookup returns their services (the
    /// nodes then run with a short `record_ttl`).
    #[arg(long, value_name = "PERCENT")]
    pub(crate) churn: Option<u32>,
    /// Where to write the JSON report [default: target/sim/sim-N.json, or
    /// sim-N-churnP.json with --churn].
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// Seed of everything drawn: keys, services, bootstrap peers, RTTs.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Nodes started at once; the next wave starts `--wave-gap-ms` later.
    #[arg(long, default_value_t = 100)]
    pub(crate) wave: usize,
    /// Pause between start waves, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub(crate) wave_gap_ms: u64,
    /// How often each node is asked for the mesh's services while waiting
    /// for convergence and for crashed nodes to disappear, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub(crate) poll_ms: u64,
    /// Longest wait for convergence, in seconds.
    #[arg(long, default_value_t = 240)]
    pub(crate) converge_timeout: u64,
    /// Give up on convergence when no node saw a new service for this long
    /// (seconds).
    #[arg(long, default_value_t = 60)]
    pub(crate) stall: u64,
    /// Longest wait for a new service to reach 99% of the nodes (seconds).
    #[arg(long, default_value_t = 120)]
    pub(crate) spread_timeout: u64,
    /// The whole run's deadline, in seconds: every wait ends by then.
    #[arg(long, default_value_t = 570)]
    pub(crate) deadline: u64,
    /// Stop measuring (and report what was measured) once the process's
    /// resident set reaches this many GiB.
    #[arg(long, default_value_t = 21.0)]
    pub(crate) max_rss_gib: f64,
    /// Set a configuration field of every node, `KEY=VALUE` as the node's
    /// own `--set` takes it (repeatable; e.g. `--set conn_mgr_high=96`).
    /// The simulation's own fields (listen, bootstrap, mDNS, reachability,
    /// a churn run's record lifetime) are applied on top.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub(crate) overrides: Vec<(String, String)>,
}

/// Fewest single-holder models the lookup figures are meant for.
pub(crate) const MIN_SINGLE_HOLDERS: usize = 100;

impl Args {
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.nodes < 2 {
            bail!("--nodes must be at least 2");
        }
        if self.wave == 0 {
            bail!("--wave must be at least 1");
        }
        if self.poll_ms == 0 {
            bail!("--poll-ms must be at least 1");
        }
        if !(self.max_rss_gib.is_finite() && self.max_rss_gib > 0.0) {
            bail!("--max-rss-gib must be a positive number");
        }
        if let Some(p) = self.churn
            && !(1..=90).contains(&p)
        {
            bail!("--churn must be 1 to 90 (percent of the nodes)");
        }
        Ok(())
    }

    /// `--json`, or `<target dir>/sim/sim-<N>.json`.
    pub(crate) fn json_path(&self) -> PathBuf {
        self.json.clone().unwrap_or_else(|| {
            let churn = self.churn.map(|p| format!("-churn{p}")).unwrap_or_default();
            target_dir()
                .join("sim")
                .join(format!("sim-{}{churn}.json", self.nodes))
        })
    }

    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked positive; GiB to bytes
    pub(crate) fn max_rss_bytes(&self) -> u64 {
        (self.max_rss_gib * 1024.0 * 1024.0 * 1024.0) as u64
    }

    /// The configuration every node starts from: the defaults with the
    /// `--set` overrides.
    pub(crate) fn base_config(&self) -> anyhow::Result<NodeConfig> {
        let loader = self
            .overrides
            .iter()
            .fold(ConfigLoader::new(), |l, (k, v)| l.set(k, v));
        loader.load().context("--set")
    }

    pub(crate) fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
}

/// The workspace's target directory (as cargo and `cargo xtask` find it).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .or_else(|| std::env::var_os("CARGO_BUILD_TARGET_DIR"))
        .map_or_else(
            || {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join("..")
                    .join("target")
            },
            PathBuf::from,
        )
}

/// `MIN..MAX` in milliseconds (or one number for a fixed RTT).
fn parse_rtt(s: &str) -> anyhow::Result<RangeInclusive<Duration>> {
    let ms = |v: &str| -> anyhow::Result<Duration> {
        let v: u64 = v
            .trim()
            .parse()
            .with_context(|| format!("`{v}` is not a number of milliseconds"))?;
        Ok(Duration::from_millis(v))
    };
    let (min, max) = match s.split_once("..") {
        Some((min, max)) => (ms(min)?, ms(max.trim_start_matches('='))?),
        None => (ms(s)?, ms(s)?),
    };
    if min > max {
        bail!("the RTT range {s} is empty: MIN must not exceed MAX");
    }
    Ok(min..=max)
}

/// `KEY=VALUE`.
fn parse_set(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("`{text}`: expected KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_ranges_parse() {
        let ms = Duration::from_millis;
        assert_eq!(parse_rtt("20..80").unwrap(), ms(20)..=ms(80));
        assert_eq!(parse_rtt("20..=80").unwrap(), ms(20)..=ms(80));
        assert_eq!(parse_rtt("50").unwrap(), ms(50)..=ms(50));
        assert!(parse_rtt("80..20").is_err());
        assert!(parse_rtt("a..b").is_err());
    }

    #[test]
    fn set_overrides_parse_and_reach_the_base_config() {
        assert_eq!(
            parse_set("idle_connection_timeout=5m").unwrap(),
            ("idle_connection_timeout".to_owned(), "5m".to_owned())
        );
        assert!(parse_set("=5m").is_err());
        assert!(parse_set("no equals sign").is_err());
        let args =
            Args::try_parse_from(["sim", "--nodes", "3", "--set", "conn_mgr_low=7"]).unwrap();
        assert_eq!(args.base_config().unwrap().conn_mgr_low, 7);
        let bad =
            Args::try_parse_from(["sim", "--nodes", "3", "--set", "conn_mgr_low=many"]).unwrap();
        assert!(bad.base_config().is_err());
    }
}
