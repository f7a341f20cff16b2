//! Compiles `niix/v1/*.proto` and the Open Inference Protocol
//! (`inference/open_inference.proto`) with a vendored `protoc`, so a fresh
//! machine needs nothing preinstalled. Also writes the file descriptor sets
//! that the server's gRPC reflection service publishes. Also compiles ONNX's
//! own `onnx/onnx-ml.proto` (vendored, see NOTICE) into `niix_proto::onnx`,
//! so the model fit can edit graphs: messages only, no service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let include = protoc_bin_vendored::include_path()?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "niix/v1/report.proto",
        "niix/v1/scan.proto",
        "niix/v1/ingest.proto",
        "niix/v1/findings.proto",
        "niix/v1/exchange.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        // Requests that do not parse are the sender's fault: see src/codec.rs.
        .codec_path("crate::codec::NiixCodec")
        // Plane bytes arrive as slices of tonic's receive buffer, not copies.
        .bytes(".niix.v1.PlaneChunk.data")
        .file_descriptor_set_path(out.join("niix_v1_descriptor.bin"))
        .compile_protos(&protos.map(PathBuf::from), &[PathBuf::from("."), include.clone()])?;

    let oip = "inference/open_inference.proto";
    println!("cargo:rerun-if-changed={oip}");
    tonic_prost_build::configure()
        .codec_path("crate::codec::NiixCodec")
        // Plane tensors arrive as slices of tonic's receive buffer, not copies.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .file_descriptor_set_path(out.join("inference_descriptor.bin"))
        .compile_protos(&[PathBuf::from(oip)], &[PathBuf::from("."), include.clone()])?;

    // ONNX model files: proto2 messages, no services, so no gRPC client or
    // server. `raw_data` (the weights) stays a Vec<u8>: the fit edits it.
    let onnx = "onnx/onnx-ml.proto";
    println!("cargo:rerun-if-changed={onnx}");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&[PathBuf::from(onnx)], &[PathBuf::from("."), include])?;
    Ok(())
}
