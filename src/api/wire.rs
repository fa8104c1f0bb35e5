//! Shim wire protocol (owned by the shim).
