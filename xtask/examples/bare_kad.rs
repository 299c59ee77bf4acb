//! The yardstick of `cargo xtask rss`: a bare rust-libp2p Kademlia node and
//! nothing else — TCP + Noise + Yamux, identify, Kademlia in server mode,
//! listening on `127.0.0.1:0`, on tokio's default multi-thread runtime.
//! It prints `node running <address>` once it listens and runs until killed.
//!
//! ```text
//! cargo run --release -p xtask --example bare_kad
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{StreamProtocol, identify, kad, noise, tcp, yamux};

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare_kad: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let kad_config = kad::Config::new(StreamProtocol::new("/bare/kad/1.0.0"));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            kad.set_mode(Some(kad::Mode::Server));
            Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/bare/1.0.0".to_owned(),
                    key.public(),
                )),
                kad,
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            println!("node running {address}/p2p/{}", swarm.local_peer_id());
        }
    }
}
