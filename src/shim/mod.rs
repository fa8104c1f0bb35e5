//! Node shim.
