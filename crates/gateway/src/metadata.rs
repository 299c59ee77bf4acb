//! The metadata keys of an `ollama/…` service that gateways route by:
//! written by [`OllamaAdvertiser`](crate::OllamaAdvertiser) and
//! [`model_service`](crate::model_service) on the serving node, read by
//! every gateway that chooses a node for a request.

/// Whether the model is loaded in its Ollama's memory (`true` or
/// `false`): gateways try warm nodes before cold ones, and `/api/ps` lists
/// the models loaded somewhere in the mesh.
pub const METADATA_LOADED: &str = "loaded";

/// Requests the serving node has in flight for peers, as it last
/// advertised (a number): among warm nodes, fewer first.
pub const METADATA_IN_FLIGHT: &str = "in_flight";

/// Requests the serving node serves for peers at once, all peers
/// together (a number, `gateway_max_concurrent` there).
pub const METADATA_MAX_CONCURRENT: &str = "max_concurrent";

/// Requests the serving node serves at once for one peer (a number): a
/// gateway sends it no more than that at once and queues the rest.
pub const METADATA_MAX_CONCURRENT_PER_PEER: &str = "max_concurrent_per_peer";
