#![doc = include_str!("../README.md")]

mod advertise;
mod affinity;
mod breaker;
pub mod frame;
mod http;
mod in_flight;
mod metadata;
mod metrics;
mod queue;
mod serve;

pub use advertise::{LOAD_REFRESH_INTERVAL, OllamaAdvertiser, SERVICE_ID_PREFIX, model_service};
pub use http::{GatewayConfig, GatewayServer, requested_model, router};
pub use metadata::{
    METADATA_CONTEXT_LENGTH, METADATA_IN_FLIGHT, METADATA_LOADED, METADATA_MAX_CONCURRENT,
    METADATA_MAX_CONCURRENT_PER_PEER, METADATA_SIZE_BYTES,
};
pub use serve::{
    FORWARDED_PATHS, ForwardBody, Forwarded, INFER_PROTOCOL, INFER_PROTOCOL_V1, InferenceLoad,
    LocalOllama, ServeLimits, serve_inference,
};
