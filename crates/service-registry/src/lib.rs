#![doc = include_str!("../README.md")]

mod cache;
mod local;
pub mod metadata;
mod rank;
mod record;
mod service;

pub use cache::{
    Accepted, CachedPage, CachedRecord, ChangeKind, MAX_EVICTED_REMEMBERED, RecordCache,
    ServiceChange, diff,
};
pub use local::{LocalServices, RegisterError};
pub use ollamacron_scoring::{QualityInputs, ScoreBreakdown, ScoreWeights};
pub use rank::{Candidate, RankedService, rank_services};
pub use record::{
    MAX_CLOCK_OFFSET, MAX_CLOCK_SKEW, MAX_RECORD_PAGES, NODE_RECORD_DOMAIN,
    NODE_RECORD_PAYLOAD_TYPE, NodeRecord, RECORD_VERSION, RECORD_VERSION_PAGED, RecordError,
    RecordLimits, RejectReason, SignedPage, clamp_clock_offset, sign_record, sign_record_pages,
    verify_record,
};
pub use service::{ServiceInfo, ServiceQuery, ServiceStatus, model_with_tag, same_model};
