//! MQTT's vocabulary without any I/O: what a valid topic or filter is and how a topic trie is
//! walked. The broker, its configuration and the operator's validation all agree because they
//! all call this crate.

#[cfg(feature = "codec")]
pub mod codec;
pub mod keyed;
pub mod reason;
pub mod topic;
pub mod trie;
