//! Metadata keys of a model service (`ServiceInfo::metadata`) that the
//! serving node writes and every other node reads: gateways route by
//! them, the API's `/v1/models` and the dashboard show them.

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

/// The model's size on disk, in bytes (a number).
pub const METADATA_SIZE_BYTES: &str = "size_bytes";

/// The model's context length, in tokens (a number).
pub const METADATA_CONTEXT_LENGTH: &str = "context_length";
