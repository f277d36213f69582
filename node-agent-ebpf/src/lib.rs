//! Trazor's kernel programs live in `main.rs`, built for `bpfel-unknown-none` by the node
//! agent's build script. This library target is empty on purpose: the node agent declares
//! this crate as a build-dependency so cargo rebuilds the agent when the programs change.
#![no_std]
