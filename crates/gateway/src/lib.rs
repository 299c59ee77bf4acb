#![doc = include_str!("../README.md")]

mod advertise;

pub use advertise::{OllamaAdvertiser, SERVICE_ID_PREFIX, model_service};
