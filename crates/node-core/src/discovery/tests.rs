//! Behaviour-level tests of the discovery behaviour on the memory transport.
