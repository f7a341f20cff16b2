//! The vendored ONNX schema knows every field of niix's model files: prost
//! drops unknown fields on decode, so a field the schema lacked would vanish
//! when a fit writes a graph back. Decoding and re-encoding must give the
//! file's own bytes.

use std::path::Path;

use niix_proto::onnx::ModelProto;
use prost::Message;

fn round_trip(relative: &str) -> ModelProto {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let model = ModelProto::decode(bytes.as_slice()).expect("a valid ONNX model");
    let again = model.encode_to_vec();
    assert_eq!(again.len(), bytes.len(), "{relative}: re-encoded length differs");
    if let Some(at) = again.iter().zip(&bytes).position(|(a, b)| a != b) {
        panic!("{relative}: re-encoded bytes differ from offset {at}");
    }
    model
}

#[test]
fn the_patchcore_model_round_trips_byte_for_byte() {
    let model = round_trip("fixtures/patchcore/model.onnx");
    let graph = model.graph.expect("a graph");
    assert!(graph.node.iter().any(|n| n.op_type.as_deref() == Some("Gemm")), "the nearest-neighbour search");
    assert!(
        graph.initializer.iter().any(|t| t.name.as_deref() == Some("memory_bank"))
            || graph.input.iter().any(|i| i.name.as_deref() == Some("memory_bank"))
    );
}

#[test]
fn the_patchcore_feature_graph_round_trips_byte_for_byte() {
    let model = round_trip("fixtures/patchcore/features.onnx");
    let graph = model.graph.expect("a graph");
    assert!(graph.output.iter().any(|o| o.name.as_deref() == Some("features")));
}
