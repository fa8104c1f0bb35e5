//! guestcred: reset guest passwords and rotate SSH keys inside running KubeVirt-style VMs.
//!
//! Architecture (see README): `api` holds the custom resources and the shim wire types,
//! `controller` reconciles them, `shim` is the node-local agent bridge, and `lab` (feature
//! `lab`, never shipped) is the test world: an API-server emulator and a real-guest lab.
#![deny(unsafe_code)]

pub mod api;
pub mod controller;
pub mod metrics;
pub mod shim;
pub mod telemetry;

#[cfg(feature = "lab")]
pub mod lab;
