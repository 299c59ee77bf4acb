//! Driving swarms of one behaviour in the behaviour tests: a bounded
//! drive over several swarms at once (`drive`, `until`) and an address
//! nobody listens on.

use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, Swarm};

/// How long `until` waits for what a test expects.
pub(crate) const LIMIT: Duration = Duration::from_secs(20);

/// What `drive` shows a test at each step: the swarms, and an event of
/// swarm `index` (`Some`), or `None` after every pass over the swarms.
pub(crate) type Step<'a, B, T> = dyn FnMut(
        &mut [Swarm<B>],
        Option<(usize, SwarmEvent<<B as NetworkBehaviour>::ToSwarm>)>,
    ) -> Option<T>
    + 'a;

/// An address on the memory transport nobody listens on.
pub(crate) fn unused_address() -> Multiaddr {
    Protocol::Memory(rand::random::<u64>() | (1 << 63)).into()
}

/// Drive every swarm for at most `limit`. `step` sees each event
/// (`Some((index, event))`) and, after every pass over the swarms, `None`
/// (to check what no event announces, like a reply). The first `Some` it
/// returns ends the drive; `None` if none came in time.
pub(crate) async fn drive<B: NetworkBehaviour, T>(
    swarms: &mut [Swarm<B>],
    limit: Duration,
    step: &mut Step<'_, B, T>,
) -> Option<T> {
    let run = std::future::poll_fn(|cx| {
        loop {
            let mut progressed = false;
            for index in 0..swarms.len() {
                if let Poll::Ready(Some(event)) = swarms[index].poll_next_unpin(cx) {
                    progressed = true;
                    if let Some(out) = step(swarms, Some((index, event))) {
                        return Poll::Ready(out);
                    }
                }
            }
            if let Some(out) = step(swarms, None) {
                return Poll::Ready(out);
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    });
    tokio::time::timeout(limit, run).await.ok()
}

/// [`drive`] that must succeed within [`LIMIT`].
pub(crate) async fn until<B: NetworkBehaviour, T>(
    swarms: &mut [Swarm<B>],
    what: &str,
    mut step: impl FnMut(
        &mut [Swarm<B>],
        Option<(usize, SwarmEvent<<B as NetworkBehaviour>::ToSwarm>)>,
    ) -> Option<T>,
) -> T {
    drive(swarms, LIMIT, &mut step)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Listen on a fresh memory address (also made external) and return it.
pub(crate) async fn listen<B: NetworkBehaviour>(swarm: &mut Swarm<B>) -> Multiaddr {
    let Ok(listener) = swarm.listen_on(Protocol::Memory(0).into()) else {
        panic!("the memory transport refused to listen");
    };
    let address = until(
        std::slice::from_mut(swarm),
        "a listen address",
        |_, event| match event {
            Some((
                _,
                SwarmEvent::NewListenAddr {
                    listener_id,
                    address,
                },
            )) if listener_id == listener => Some(address),
            _ => None,
        },
    )
    .await;
    swarm.add_external_address(address.clone());
    address
}
