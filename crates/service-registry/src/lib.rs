#![doc = include_str!("../README.md")]

mod record;
mod service;

pub use record::{
    NODE_RECORD_DOMAIN, NODE_RECORD_PAYLOAD_TYPE, NodeRecord, RECORD_VERSION, RecordError,
    RecordLimits, RejectReason, sign_record, verify_record,
};
pub use service::{ServiceInfo, ServiceQuery, ServiceStatus};
