//! guestcred: reset guest passwords and rotate SSH keys inside running KubeVirt-style VMs.
//!
//! Architecture (see README): `api` (the `guestcred-api` package, re-exported here) holds
//! the custom resources, the shim wire types and the input rules both sides check;
//! `controller` reconciles the resources; `shim` is the node-local agent bridge; `runtime`
//! is what both binaries share (logging, signals, health and metrics endpoints). The test
//! world lives in the `guestcred-lab` package and is never part of this one.
#![deny(unsafe_code)]

pub use guestcred_api as api;

pub mod controller;
pub mod metrics;
pub mod runtime;
pub mod shim;
pub mod tls;
