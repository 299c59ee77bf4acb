#![doc = include_str!("../README.md")]

mod advertise;
pub mod frame;
mod http;
mod in_flight;
mod metrics;
mod serve;

pub use advertise::{LOAD_REFRESH_INTERVAL, OllamaAdvertiser, SERVICE_ID_PREFIX, model_service};
pub use http::{GatewayConfig, MAX_REQUEST_BYTES, router};
pub use serve::{
    FORWARDED_PATHS, Forwarded, INFER_PROTOCOL, InferenceLoad, LocalOllama, ServeLimits,
    serve_inference,
};
