//! Custom resources, KubeVirt types we read, condition reasons and the shim wire protocol.
pub mod wire;
