//! The metadata keys of an `ollama/…` service that gateways route by:
//! written by [`OllamaAdvertiser`](crate::OllamaAdvertiser) and
//! [`model_service`](crate::model_service) on the serving node, read by
//! every gateway that chooses a node for a request. They are defined
//! with [`ServiceInfo`](ollamacron_service_registry::ServiceInfo), whose
//! readers (the API's `/v1/models`) need them without the gateway.

pub use ollamacron_node_core::registry::metadata::{
    METADATA_CONTEXT_LENGTH, METADATA_IN_FLIGHT, METADATA_LOADED, METADATA_MAX_CONCURRENT,
    METADATA_MAX_CONCURRENT_PER_PEER, METADATA_SIZE_BYTES,
};
