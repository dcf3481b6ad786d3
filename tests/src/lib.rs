//! Cross-crate end-to-end tests: flows that span crates that do not depend on each other (the
//! operator renders a pod's environment, the launcher reads it). They arrive with the operator.
//!
//! The launcher's own end-to-end tests (real `ferrun`, `torchrun` and torch processes) live in
//! `launcher/tests/`, where cargo hands them the `ferrun` binary.
