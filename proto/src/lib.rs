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

/// Generated types of the Open Inference Protocol (KServe v2), package
/// `inference`: the subset niix serves (see `inference/open_inference.proto`).
#[allow(clippy::all, missing_docs)]
pub mod oip {
    tonic::include_proto!("inference");

    /// Encoded `FileDescriptorSet` of the protocol's file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");
}

/// ONNX's model format (package `onnx`, from the vendored
/// `onnx/onnx-ml.proto`, Apache-2.0, see NOTICE): the messages of a `.onnx`
/// file, so that a fit can read and rewrite a model graph. `-ml` is the
/// superset of `onnx.proto`, so no field of a model decodes as unknown (prost
/// would drop it on re-encoding).
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    tonic::include_proto!("onnx");
}

pub mod codec;

/// Largest message a stock gRPC peer accepts (and niix's ingest and findings
/// services): 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Most plane bytes one `PlaneChunk` may carry: 4 MiB less the worst-case
/// framing of a `PushScanRequest` around it (27 bytes: the chunk field's tag
/// and length, `plane_index` and `offset` at their longest, the data field's
/// tag and length), so that any chunk of this size fits one message whatever
/// its plane index and offset.
pub const MAX_CHUNK_DATA: usize = MAX_MESSAGE_BYTES - 27;

pub use v1::*;

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn chunk(plane_index: u32, offset: u64, data: usize) -> PushScanRequest {
        PushScanRequest {
            part: Some(push_scan_request::Part::Chunk(PlaneChunk {
                plane_index,
                offset,
                data: vec![7u8; data].into(),
            })),
        }
    }

    #[test]
    fn the_largest_chunk_fits_one_message_at_any_plane_and_offset() {
        assert_eq!(chunk(u32::MAX, u64::MAX, MAX_CHUNK_DATA).encoded_len(), MAX_MESSAGE_BYTES);
        assert_eq!(chunk(u32::MAX, u64::MAX, MAX_CHUNK_DATA + 1).encoded_len(), MAX_MESSAGE_BYTES + 1);
        assert!(chunk(0, 0, MAX_CHUNK_DATA + 1).encoded_len() < MAX_MESSAGE_BYTES);
    }
}
