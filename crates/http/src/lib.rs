#![doc = include_str!("../README.md")]

mod access;
mod client;
mod server;

pub use access::{AccessPolicy, OLLAMA_ORIGINS_VAR, default_allowed_origins};
pub use client::http_client;
pub use server::{BodyTimeout, HttpLimits, serve};
