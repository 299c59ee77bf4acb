//! Behaviour-level tests of the registry behaviour on the memory transport.
