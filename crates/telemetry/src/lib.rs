#![doc = include_str!("../README.md")]

#[cfg(feature = "otlp")]
mod otlp;

#[cfg(feature = "otlp")]
pub use otlp::{OTLP_TRACES_PATH, OtlpError, OtlpSettings, OtlpTraces, traces_url};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::{OpenTelemetrySpanExt, SetParentError};

/// The longest `traceparent` accepted (version 00 is 55 bytes; later
/// versions may append fields).
pub const MAX_TRACEPARENT_BYTES: usize = 256;

/// The longest `tracestate` passed on (the W3C limit is 32 members).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Why a received trace context was not adopted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceContextError {
    /// Longer than [`MAX_TRACEPARENT_BYTES`] or [`MAX_TRACESTATE_BYTES`].
    #[error("the {field} is {bytes} bytes, over the limit of {limit}")]
    TooLong {
        /// `traceparent` or `tracestate`.
        field: &'static str,
        /// Its length.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Not `version-traceid-parentid-flags` in lower-case hex.
    #[error("the traceparent {0:?} is not version-traceid-parentid-flags in lower-case hex")]
    Malformed(String),
    /// Version `ff`, or an all-zero trace or parent id.
    #[error("the traceparent {0:?} has an invalid version or an all-zero id")]
    Invalid(String),
}

/// A W3C trace context, as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<trace id>-<parent span id>-<flags>`.
    pub traceparent: String,
    /// Vendors' state, passed on unchanged.
    pub tracestate: Option<String>,
    span: SpanContext,
}

impl TraceContext {
    /// The context of `span` as OpenTelemetry knows it, to send with a
    /// request so the receiver's spans join its trace; `None` when no
    /// OpenTelemetry layer records it (traces are off).
    #[must_use]
    pub fn of(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        let span_context = context.span().span_context().clone();
        span_context
            .is_valid()
            .then(|| Self::from_span(span_context))
    }

    /// `span` with its headers, as version 00 writes them.
    fn from_span(span: SpanContext) -> Self {
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        );
        let state = span.trace_state().header();
        Self {
            traceparent,
            tracestate: (!state.is_empty()).then_some(state),
            span,
        }
    }

    /// The context of the current span ([`TraceContext::of`]).
    #[must_use]
    pub fn current() -> Option<Self> {
        Self::of(&tracing::Span::current())
    }

    /// A received context, checked as the W3C Trace Context
    /// specification says (a future version's extra fields are allowed
    /// and ignored); a `tracestate` that does not parse is dropped.
    ///
    /// # Errors
    /// What is wrong with the `traceparent`, or either is too long.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceContextError> {
        if traceparent.len() > MAX_TRACEPARENT_BYTES {
            return Err(TraceContextError::TooLong {
                field: "traceparent",
                bytes: traceparent.len(),
                limit: MAX_TRACEPARENT_BYTES,
            });
        }
        if let Some(state) = tracestate
            && state.len() > MAX_TRACESTATE_BYTES
        {
            return Err(TraceContextError::TooLong {
                field: "tracestate",
                bytes: state.len(),
                limit: MAX_TRACESTATE_BYTES,
            });
        }
        let malformed = || TraceContextError::Malformed(traceparent.to_owned());
        let mut parts = traceparent.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !(lower_hex(version, 2)
            && lower_hex(trace, 32)
            && lower_hex(parent, 16)
            && lower_hex(flags, 2))
        {
            return Err(malformed());
        }
        // Version 00 has exactly four fields; a later one may have more.
        if version == "00" && parts.next().is_some() {
            return Err(malformed());
        }
        let trace_id = TraceId::from_hex(trace).map_err(|_| malformed())?;
        let span_id = SpanId::from_hex(parent).map_err(|_| malformed())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| malformed())?;
        if version == "ff" || trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return Err(TraceContextError::Invalid(traceparent.to_owned()));
        }
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        Ok(Self::from_span(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags) & TraceFlags::SAMPLED,
            true,
            state,
        )))
    }

    /// The trace id, 32 lower-case hex digits.
    #[must_use]
    pub fn trace_id(&self) -> String {
        self.span.trace_id().to_string()
    }

    /// Make `span` a child of this (remote) context, so it and its
    /// children belong to the sender's trace. Does nothing without an
    /// OpenTelemetry layer, or once `span` has started recording children.
    pub fn adopt(&self, span: &tracing::Span) {
        let context = opentelemetry::Context::new().with_remote_span_context(self.span.clone());
        match span.set_parent(context) {
            // Traces are off here, or this span is not exported: nothing
            // to join, nothing to say (it would be said at every request).
            Ok(()) | Err(SetParentError::LayerNotFound | SetParentError::SpanDisabled) => {}
            Err(e) => tracing::debug!(error = %e, "cannot join the sender's trace"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_examples_parse_and_bad_ones_say_why() {
        let parsed =
            TraceContext::parse(EXAMPLE, Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")).unwrap();
        assert_eq!(parsed.traceparent, EXAMPLE);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            parsed.tracestate.as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        // A later version's extra field is ignored; what is sent on is 00.
        let later = TraceContext::parse(&format!("01{}-extra", &EXAMPLE[2..]), None).unwrap();
        assert_eq!(later.traceparent, EXAMPLE);
        for (bad, why) in [
            ("", "malformed"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "malformed",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "malformed",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                "malformed",
            ),
            (&format!("{EXAMPLE}-extra"), "malformed"),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "invalid",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "invalid",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "invalid",
            ),
            (
                "00-é92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
                "malformed",
            ),
        ] {
            let e = TraceContext::parse(bad, None).unwrap_err();
            let kind = match e {
                TraceContextError::Malformed(_) => "malformed",
                TraceContextError::Invalid(_) => "invalid",
                TraceContextError::TooLong { .. } => "too long",
            };
            assert_eq!(kind, why, "{bad:?}: {e}");
        }
        let long = "0".repeat(MAX_TRACEPARENT_BYTES + 1);
        assert!(matches!(
            TraceContext::parse(&long, None),
            Err(TraceContextError::TooLong {
                field: "traceparent",
                ..
            })
        ));
        let state = "a=b,".repeat(MAX_TRACESTATE_BYTES);
        assert!(matches!(
            TraceContext::parse(EXAMPLE, Some(&state)),
            Err(TraceContextError::TooLong {
                field: "tracestate",
                ..
            })
        ));
        // A tracestate that does not parse is dropped, not fatal.
        let odd = TraceContext::parse(EXAMPLE, Some("no equals sign")).unwrap();
        assert_eq!(odd.tracestate, None);
    }

    #[test]
    fn without_an_opentelemetry_layer_there_is_no_context() {
        let span = tracing::info_span!("anything");
        assert!(TraceContext::of(&span).is_none());
        TraceContext::parse(EXAMPLE, None).unwrap().adopt(&span);
        assert!(TraceContext::of(&span).is_none());
    }

    proptest! {
        #[test]
        fn any_text_is_refused_or_read_back_the_same(text in "\\PC{0,80}", state in proptest::option::of("\\PC{0,40}")) {
            if let Ok(parsed) = TraceContext::parse(&text, state.as_deref()) {
                let again = TraceContext::parse(&parsed.traceparent, parsed.tracestate.as_deref()).unwrap();
                prop_assert_eq!(again, parsed);
            }
        }

        #[test]
        fn every_valid_context_reads_back(trace in 1u128.., span in 1u64.., sampled: bool) {
            let text = format!("00-{trace:032x}-{span:016x}-{:02x}", u8::from(sampled));
            let parsed = TraceContext::parse(&text, None).unwrap();
            prop_assert_eq!(&parsed.traceparent, &text);
            prop_assert_eq!(parsed.trace_id(), format!("{trace:032x}"));
        }
    }
}
