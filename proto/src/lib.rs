//! The `niix.v1` protocol: messages and gRPC service definitions generated
//! from `proto/niix/v1/*.proto`. This crate owns the wire format; the server
//! and clients depend on it, never the other way round.

/// Generated types of package `niix.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("niix.v1");

    /// Encoded `FileDescriptorSet` of every niix.v1 file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("niix_v1_descriptor");
}

pub mod codec;

pub use v1::*;
