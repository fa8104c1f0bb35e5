//! The test world: never shipped in product images.
pub mod apiserver;
pub mod cluster;
pub mod guest;
pub mod hostqga;
pub mod kubevirt;
pub mod world;
