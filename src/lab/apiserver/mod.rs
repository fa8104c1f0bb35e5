//! Kubernetes API-server emulator.
