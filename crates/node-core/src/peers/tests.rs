//! Behaviour-level tests of the peers behaviour on the memory transport.
