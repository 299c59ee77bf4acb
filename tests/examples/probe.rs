//! Dial a running node as an independent libp2p peer (TCP + Noise + Yamux),
//! identify it and ping it:
//!
//! ```text
//! cargo run -p ollamacron-tests --example probe -- /ip4/127.0.0.1/tcp/11436/p2p/12D3KooW...
//! ```

use std::process::ExitCode;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
#[allow(clippy::print_stdout, clippy::print_stderr)]
async fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: probe <multiaddr of a node>");
        return ExitCode::from(2);
    };
    let addr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("`{addr}` is not a multiaddr: {e}");
            return ExitCode::from(2);
        }
    };
    match ollamacron_tests::probe::probe(addr, Duration::from_secs(10)).await {
        Ok(report) => {
            println!("peer id:          {}", report.peer_id);
            println!("protocol version: {}", report.protocol_version);
            println!("agent version:    {}", report.agent_version);
            println!("ping rtt:         {:?}", report.rtt);
            let protocols: Vec<String> = report.protocols.iter().map(ToString::to_string).collect();
            println!("protocols:        {}", protocols.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("probe failed: {e}");
            ExitCode::from(1)
        }
    }
}
