//! Reading and editing an ONNX model in Rust, so that a fit can write
//! trained weights back into the version's graph and serving stays ONNX
//! Runtime (docs/notes/site-training-plan.md, §2.2).
//!
//! [`OnnxModel`] wraps the `ModelProto` of the vendored schema
//! (`niix_proto::onnx`): named initializers read and replaced as float32
//! arrays, nodes added, the graph pruned to chosen outputs, subnormal weights
//! flushed, metadata set. [`compose_site_head`] turns the shipped detector
//! (distance term plus three conv heads) into one with the site head of §2.1,
//! and [`training_graph`] cuts from it the graph a fit runs to get each
//! cell's `features` and `head_input`.

use std::collections::{HashMap, HashSet};

use ndarray::{ArrayD, IxDyn};
use niix_proto::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
};
use prost::Message;

/// Channels of the site head's per-cell input `head_input` (§2.1).
pub const HEAD_INPUT_CHANNELS: usize = 142;
/// Hidden units of the site head.
pub const SITE_HIDDEN: usize = 64;
/// Bias of the site head's logit before training: a cell scores as clearly
/// normal until the fit has trained the head.
pub const UNTRAINED_LOGIT: f32 = -10.0;
/// Weight of the memory bank's distance beside the head when a head-less
/// base gives none (`niix model fit --distance-weight` sets its own).
pub const DEFAULT_DISTANCE_WEIGHT: f32 = 0.28;

/// Names of the site head's weights in the graph.
pub mod site {
    /// `[64, 142, 1, 1]`: the first 1x1 convolution.
    pub const W1: &str = "site_w1";
    /// `[64]`.
    pub const B1: &str = "site_b1";
    /// `[1, 64, 1, 1]`: the second 1x1 convolution, giving the logit.
    pub const W2: &str = "site_w2";
    /// `[1]`.
    pub const B2: &str = "site_b2";
    /// The graph value of the per-cell input `[N, 142, h, w]`.
    pub const HEAD_INPUT: &str = "head_input";
    /// The graph value of the site head's logit `[N, 1, h, w]`.
    pub const LOGIT: &str = "site_logit";
}

/// Metadata keys of the Python heads, which a composed graph no longer has.
const STALE_METADATA: [&str; 5] = ["head", "second_head", "pixel_branch", "head_weight", "head_score"];

/// An ONNX graph could not be read or edited.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The bytes are not an ONNX `ModelProto`.
    #[error("not an ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The model has no graph.
    #[error("the ONNX model has no graph")]
    NoGraph,
    /// No initializer of that name.
    #[error("the graph has no initializer {0:?}")]
    NoInitializer(String),
    /// The initializer is not float32.
    #[error("initializer {name:?} holds {data_type}, not float32")]
    NotFloat {
        /// The initializer.
        name: String,
        /// Its ONNX data type.
        data_type: String,
    },
    /// The initializer's data do not match its dimensions, or live outside the file.
    #[error("initializer {name:?} cannot be read: {reason}")]
    BadTensor {
        /// The initializer.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An initializer of that name exists already.
    #[error("the graph has an initializer {0:?} already")]
    Duplicate(String),
    /// A requested output is produced by no node, initializer or input.
    #[error("nothing in the graph produces {0:?}")]
    Unproduced(String),
    /// The graph does not have the shape the site head is composed onto.
    #[error("cannot add the site head: {0}")]
    Compose(String),
}

/// An ONNX model held as its protobuf message.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxModel(pub ModelProto);

/// A node attribute, for [`OnnxModel::add_node`].
#[derive(Debug, Clone)]
pub enum Attr {
    /// One integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// One float.
    Float(f32),
}

impl OnnxModel {
    /// Decodes a `.onnx` file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<OnnxModel, GraphError> {
        let model = ModelProto::decode(bytes)?;
        if model.graph.is_none() {
            return Err(GraphError::NoGraph);
        }
        Ok(OnnxModel(model))
    }

    /// Encodes it (fields in tag order, as ONNX's own serializer writes them).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.encode_to_vec()
    }

    /// The graph.
    pub fn graph(&self) -> &GraphProto {
        self.0.graph.as_ref().expect("checked at decode")
    }

    fn graph_mut(&mut self) -> &mut GraphProto {
        self.0.graph.as_mut().expect("checked at decode")
    }

    /// Names of the graph's inputs.
    pub fn input_names(&self) -> Vec<&str> {
        self.graph().input.iter().map(|v| v.name()).collect()
    }

    /// Names of the graph's outputs.
    pub fn output_names(&self) -> Vec<&str> {
        self.graph().output.iter().map(|v| v.name()).collect()
    }

    /// Whether an initializer of that name exists.
    pub fn has_initializer(&self, name: &str) -> bool {
        self.graph().initializer.iter().any(|t| t.name() == name)
    }

    fn tensor(&self, name: &str) -> Result<&TensorProto, GraphError> {
        self.graph().initializer.iter().find(|t| t.name() == name).ok_or_else(|| GraphError::NoInitializer(name.into()))
    }

    /// A float32 initializer's values, from `raw_data` (little-endian) or `float_data`.
    pub fn initializer(&self, name: &str) -> Result<ArrayD<f32>, GraphError> {
        let t = self.tensor(name)?;
        check_float(t)?;
        let bad = |reason: String| GraphError::BadTensor { name: name.into(), reason };
        if t.data_location == Some(1) {
            return Err(bad("its data are stored outside the model file".into()));
        }
        let shape: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("negative dimension in {:?}", t.dims)))?;
        let values: Vec<f32> = match &t.raw_data {
            Some(raw) if !raw.is_empty() || t.float_data.is_empty() => {
                if raw.len() % 4 != 0 {
                    return Err(bad(format!("raw_data has {} bytes, not a multiple of 4", raw.len())));
                }
                raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            _ => t.float_data.clone(),
        };
        let n = values.len();
        ArrayD::from_shape_vec(IxDyn(&shape), values)
            .map_err(|_| bad(format!("{n} values do not fill dimensions {:?}", t.dims)))
    }

    /// Replaces a float32 initializer's values (and dimensions) with `values`,
    /// written as `raw_data`. Refuses a name the graph lacks and a tensor of
    /// another type.
    pub fn set_initializer(&mut self, name: &str, values: &ArrayD<f32>) -> Result<(), GraphError> {
        check_float(self.tensor(name)?)?;
        let t = self.graph_mut().initializer.iter_mut().find(|t| t.name() == name).expect("found above");
        t.dims = values.shape().iter().map(|&d| d as i64).collect();
        t.raw_data = Some(values.iter().flat_map(|v| v.to_le_bytes()).collect());
        t.float_data.clear();
        Ok(())
    }

    /// Adds a float32 initializer; refuses a name already taken.
    pub fn add_initializer(&mut self, name: &str, values: &ArrayD<f32>) -> Result<(), GraphError> {
        if self.has_initializer(name) {
            return Err(GraphError::Duplicate(name.into()));
        }
        self.graph_mut().initializer.push(float_tensor(name, values));
        Ok(())
    }

    /// Appends a node of the default domain; its name is its first output's.
    pub fn add_node(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, Attr)]) {
        self.graph_mut().node.push(node(op, inputs, outputs, attrs));
    }

    /// Makes `outputs` the graph's outputs, in that order, and drops every
    /// node, initializer and graph input they do not depend on (ONNX Runtime
    /// refuses a run that leaves a declared input unfed).
    pub fn prune(&mut self, outputs: &[&str]) -> Result<(), GraphError> {
        let g = self.graph_mut();
        let producer: HashMap<&str, usize> =
            g.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
        let sources: HashSet<&str> =
            g.initializer.iter().map(|t| t.name()).chain(g.input.iter().map(|v| v.name())).collect();
        let mut needed: HashSet<String> = HashSet::new();
        let mut keep_node = vec![false; g.node.len()];
        let mut stack: Vec<String> = Vec::new();
        for &o in outputs {
            if !producer.contains_key(o) && !sources.contains(o) {
                return Err(GraphError::Unproduced(o.into()));
            }
            stack.push(o.to_string());
        }
        while let Some(name) = stack.pop() {
            if name.is_empty() || !needed.insert(name.clone()) {
                continue;
            }
            if let Some(&i) = producer.get(name.as_str())
                && !keep_node[i]
            {
                keep_node[i] = true;
                let n = &g.node[i];
                stack.extend(n.input.iter().cloned());
                // Names a subgraph (If, Loop) reads from this scope.
                for a in &n.attribute {
                    for sub in a.g.iter().chain(&a.graphs) {
                        stack.extend(outer_names(sub));
                    }
                }
            }
        }
        let old_outputs = std::mem::take(&mut g.output);
        let new_outputs: Vec<ValueInfoProto> = outputs
            .iter()
            .map(|&o| {
                old_outputs
                    .iter()
                    .chain(&g.value_info)
                    .chain(&g.input)
                    .find(|v| v.name() == o)
                    .cloned()
                    .unwrap_or_else(|| float_value_info(o))
            })
            .collect();
        let mut i = 0;
        g.node.retain(|_| {
            i += 1;
            keep_node[i - 1]
        });
        g.initializer.retain(|t| needed.contains(t.name()));
        g.input.retain(|v| needed.contains(v.name()));
        g.value_info.retain(|v| needed.contains(v.name()));
        g.quantization_annotation.retain(|a| needed.contains(a.tensor_name()));
        g.output = new_outputs;
        Ok(())
    }

    /// Sets every subnormal float32 weight (|w| < 1.18e-38, initializers and
    /// `Constant` values) to 0: they multiply nothing measurable but cost the
    /// CPU a microcode assist each (the shipped model ran 1.9x faster without).
    /// Returns how many it changed.
    pub fn flush_subnormals(&mut self) -> usize {
        let g = self.graph_mut();
        let mut flushed = 0;
        let constants = g.node.iter_mut().flat_map(|n| n.attribute.iter_mut()).filter_map(|a| a.t.as_mut());
        for t in g.initializer.iter_mut().chain(constants) {
            if t.data_type != Some(DataType::Float as i32) {
                continue;
            }
            for v in t.float_data.iter_mut().filter(|v| v.is_subnormal()) {
                *v = 0.0;
                flushed += 1;
            }
            if let Some(raw) = t.raw_data.as_mut() {
                for b in raw.chunks_exact_mut(4) {
                    if f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_subnormal() {
                        b.copy_from_slice(&0f32.to_le_bytes());
                        flushed += 1;
                    }
                }
            }
        }
        flushed
    }

    /// Sets (or replaces) a `metadata_props` entry.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        let props = &mut self.0.metadata_props;
        match props.iter_mut().find(|p| p.key() == key) {
            Some(p) => p.value = Some(value.into()),
            None => props.push(StringStringEntryProto { key: Some(key.into()), value: Some(value.into()) }),
        }
    }

    /// A `metadata_props` value.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.0.metadata_props.iter().find(|p| p.key() == key).map(|p| p.value())
    }

    fn remove_metadata(&mut self, key: &str) {
        self.0.metadata_props.retain(|p| p.key() != key);
    }

    /// The nodes whose `op_type` is `op`.
    pub fn nodes_of(&self, op: &str) -> impl Iterator<Item = &NodeProto> {
        self.graph().node.iter().filter(move |n| n.op_type() == op)
    }
}

fn check_float(t: &TensorProto) -> Result<(), GraphError> {
    let ty = t.data_type.unwrap_or(0);
    if ty == DataType::Float as i32 {
        return Ok(());
    }
    let data_type = DataType::try_from(ty).map(|d| d.as_str_name().to_string()).unwrap_or_else(|_| ty.to_string());
    Err(GraphError::NotFloat { name: t.name().into(), data_type })
}

/// Names a subgraph reads that none of its own nodes, initializers or inputs define.
fn outer_names(g: &GraphProto) -> Vec<String> {
    let mut defined: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    defined.extend(g.input.iter().map(|v| v.name()));
    defined.extend(g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)));
    let mut out = Vec::new();
    for n in &g.node {
        out.extend(n.input.iter().filter(|i| !defined.contains(i.as_str())).cloned());
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                out.extend(outer_names(sub).into_iter().filter(|i| !defined.contains(i.as_str())));
            }
        }
    }
    out
}

fn float_tensor(name: &str, values: &ArrayD<f32>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        data_type: Some(DataType::Float as i32),
        dims: values.shape().iter().map(|&d| d as i64).collect(),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A float32 tensor value of unknown shape (ONNX Runtime infers it).
fn float_value_info(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: None,
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// A float32 `[N, channels, h, w]` value with symbolic batch and map sides.
fn map_value_info(name: &str, channels: i64) -> ValueInfoProto {
    use tensor_shape_proto::{Dimension, dimension::Value};
    let dim = |v: Value| Dimension { value: Some(v), denotation: None };
    let mut info = float_value_info(name);
    if let Some(type_proto::Value::TensorType(t)) = info.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        t.shape = Some(TensorShapeProto {
            dim: vec![
                dim(Value::DimParam("N".into())),
                dim(Value::DimValue(channels)),
                dim(Value::DimParam("h".into())),
                dim(Value::DimParam("w".into())),
            ],
        });
    }
    info
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, Attr)]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: outputs.first().map(|s| s.to_string()),
        op_type: Some(op.into()),
        attribute: attrs
            .iter()
            .map(|(name, value)| {
                let mut a = AttributeProto { name: Some(name.to_string()), ..Default::default() };
                match value {
                    Attr::Int(i) => {
                        a.i = Some(*i);
                        a.set_type(AttributeType::Int);
                    }
                    Attr::Ints(v) => {
                        a.ints = v.clone();
                        a.set_type(AttributeType::Ints);
                    }
                    Attr::Float(f) => {
                        a.f = Some(*f);
                        a.set_type(AttributeType::Float);
                    }
                }
                a
            })
            .collect(),
        ..Default::default()
    }
}

fn pool(kernel: i64, stride: i64, pad: i64) -> Vec<(&'static str, Attr)> {
    let mut attrs =
        vec![("kernel_shape", Attr::Ints(vec![kernel, kernel])), ("strides", Attr::Ints(vec![stride, stride]))];
    if pad > 0 {
        attrs.push(("pads", Attr::Ints(vec![pad; 4])));
    }
    attrs
}

fn avg_pool(kernel: i64, stride: i64, pad: i64) -> Vec<(&'static str, Attr)> {
    let mut attrs = pool(kernel, stride, pad);
    attrs.push(("count_include_pad", Attr::Int(0)));
    attrs
}

/// Adds the site head (§2.1) to a detector graph: the fixed per-cell input
/// `head_input [N, 142, h, w]` (the 66 `features`; their 7x7 mean, 224 px of
/// context; and ten statistics of the planes per cell: densest and lightest
/// 8-px block, mean, and the mean's contrast against 7x7 and 15x15 cells, each
/// for [hi, lo-hi]), then 1x1 Conv 142->64, Relu, 1x1 Conv 64->1 giving
/// `site_logit`, with weights `site_w1`, `site_b1`, `site_w2`, `site_b2`
/// (zeros, and [`UNTRAINED_LOGIT`]). The `Add` producing `anomaly_map` then
/// adds `site_logit` to `distance_term`, and the graph is pruned to
/// `anomaly_map`, which drops the Python heads and their pixel branches.
///
/// The base must have `planes` (high, low), `features`, `distance_term` and an
/// `Add` giving `anomaly_map`. A graph that already has `site_w1` is returned
/// unchanged, so a refit composes nothing twice.
pub fn compose_site_head(base: &OnnxModel) -> Result<OnnxModel, GraphError> {
    if base.has_initializer(site::W1) {
        return Ok(base.clone());
    }
    let mut m = base.clone();
    let planes = "planes";
    if !m.input_names().contains(&planes) {
        return Err(GraphError::Compose(format!("no graph input {planes:?}; the inputs are {:?}", m.input_names())));
    }
    let add = m
        .graph()
        .node
        .iter()
        .position(|n| n.output.iter().any(|o| o == "anomaly_map"))
        .ok_or_else(|| GraphError::Compose("no node produces \"anomaly_map\"".into()))?;
    let add_node = m.graph().node[add].clone();
    // A head-less base (what `build_patchcore.py` writes, fixtures/patchcore) maps the
    // distance straight through: weigh it here, as a base with heads does.
    if add_node.op_type() == "Identity" && add_node.input.len() == 1 {
        let distance = add_node.input[0].clone();
        m.add_initializer("distance_weight", &ArrayD::from_elem(IxDyn(&[]), DEFAULT_DISTANCE_WEIGHT))?;
        m.graph_mut().node[add] = node("Add", &["distance_term", site::LOGIT], &["anomaly_map"], &[]);
        m.add_node("Mul", &[&distance, "distance_weight"], &["distance_term"], &[]);
    } else if add_node.op_type() != "Add" || !add_node.input.iter().any(|i| i == "distance_term") {
        return Err(GraphError::Compose(format!(
            "anomaly_map comes from {} of {:?}, not Add(distance_term, head) or Identity(distance)",
            add_node.op_type(),
            add_node.input
        )));
    }
    let produced: HashSet<&str> = m.graph().node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    if !produced.contains("features") {
        return Err(GraphError::Compose("no node produces \"features\"".into()));
    }

    let zeros = |shape: &[usize]| ArrayD::<f32>::zeros(IxDyn(shape));
    // [hi, lo] -> [hi, lo - hi].
    let mix = ArrayD::from_shape_vec(IxDyn(&[2, 2, 1, 1]), vec![1.0, 0.0, -1.0, 1.0]).expect("4 values");
    m.add_initializer("site_mix", &mix)?;
    m.add_initializer(site::W1, &zeros(&[SITE_HIDDEN, HEAD_INPUT_CHANNELS, 1, 1]))?;
    m.add_initializer(site::B1, &zeros(&[SITE_HIDDEN]))?;
    m.add_initializer(site::W2, &zeros(&[1, SITE_HIDDEN, 1, 1]))?;
    m.add_initializer(site::B2, &ArrayD::from_elem(IxDyn(&[1]), UNTRAINED_LOGIT))?;

    m.add_node("AveragePool", &["features"], &["site_context"], &avg_pool(7, 1, 3));
    m.add_node("AveragePool", &[planes], &["site_b8_planes"], &avg_pool(8, 8, 0));
    m.add_node("Conv", &["site_b8_planes", "site_mix"], &["site_b8"], &[]);
    m.add_node("MaxPool", &["site_b8"], &["site_densest"], &pool(4, 4, 0));
    m.add_node("Neg", &["site_b8"], &["site_b8_neg"], &[]);
    m.add_node("MaxPool", &["site_b8_neg"], &["site_lightest_neg"], &pool(4, 4, 0));
    m.add_node("Neg", &["site_lightest_neg"], &["site_lightest"], &[]);
    m.add_node("AveragePool", &["site_b8"], &["site_mean"], &avg_pool(4, 4, 0));
    m.add_node("AveragePool", &["site_mean"], &["site_mean7"], &avg_pool(7, 1, 3));
    m.add_node("Sub", &["site_mean", "site_mean7"], &["site_contrast7"], &[]);
    m.add_node("AveragePool", &["site_mean"], &["site_mean15"], &avg_pool(15, 1, 7));
    m.add_node("Sub", &["site_mean", "site_mean15"], &["site_contrast15"], &[]);
    m.add_node(
        "Concat",
        &[
            "features",
            "site_context",
            "site_densest",
            "site_lightest",
            "site_mean",
            "site_contrast7",
            "site_contrast15",
        ],
        &[site::HEAD_INPUT],
        &[("axis", Attr::Int(1))],
    );
    m.add_node("Conv", &[site::HEAD_INPUT, site::W1, site::B1], &["site_hidden"], &[]);
    m.add_node("Relu", &["site_hidden"], &["site_hidden_relu"], &[]);
    m.add_node("Conv", &["site_hidden_relu", site::W2, site::B2], &[site::LOGIT], &[]);
    m.graph_mut().node[add].input = vec!["distance_term".into(), site::LOGIT.into()];
    m.prune(&["anomaly_map"])?;
    // Keep `head_input` described, so tools that read the graph see its shape.
    m.graph_mut().value_info.push(map_value_info(site::HEAD_INPUT, HEAD_INPUT_CHANNELS as i64));
    for key in STALE_METADATA {
        m.remove_metadata(key);
    }
    m.set_metadata(
        "head",
        "site head: 1x1 Conv 142->64, Relu, 1x1 Conv 64->1 over head_input (features, their 7x7 mean, 10 pooled \
         plane statistics), trained by niix model fit",
    );
    Ok(m)
}

/// The graph a fit runs on each tile (§2.2): a detector with a site head,
/// cut to `features` and `head_input`. It needs no memory bank, so its only
/// input is `planes`.
pub fn training_graph(composed: &OnnxModel) -> Result<OnnxModel, GraphError> {
    if !composed.has_initializer(site::W1) {
        return Err(GraphError::Compose("the graph has no site head: compose it first".into()));
    }
    let mut m = composed.clone();
    m.prune(&["features", site::HEAD_INPUT])?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ndarray::{Array1, Array2, Array4, Axis, s};
    use ort::session::Session;
    use ort::value::TensorRef;

    use super::*;
    use crate::runtime::environment;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/patchcore").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn session(m: &OnnxModel) -> Session {
        let env = environment().expect("ONNX Runtime for the test suite");
        Session::builder(&env)
            .unwrap()
            .with_intra_threads(1)
            .unwrap()
            .commit_from_memory(&m.to_bytes())
            .expect("ONNX Runtime loads the edited graph")
    }

    /// Two 1024 tiles in the graph's units (attenuation / 2.5): a smooth
    /// varying background with a dense block and pseudo-random texture.
    fn tiles() -> Array4<f32> {
        let mut state = 11u64;
        let mut noise = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        Array4::from_shape_fn((2, 2, 1024, 1024), |(n, c, y, x)| {
            let base = 0.4 + 0.3 * ((y as f32 / 97.0).sin() + (x as f32 / 61.0 + n as f32).cos());
            let block = if (300..420).contains(&y) && (500..700).contains(&x) { 1.2 } else { 0.0 };
            (base * (1.0 + 0.1 * c as f32) + block + 0.05 * noise()).max(0.0)
        })
    }

    fn run(session: &mut Session, feeds: Vec<(&str, ArrayD<f32>)>, outputs: &[&str]) -> Vec<ArrayD<f32>> {
        let inputs: Vec<(&str, ort::session::SessionInputValue<'_>)> =
            feeds.iter().map(|(n, v)| (*n, TensorRef::from_array_view(v.view()).unwrap().into())).collect();
        let out = session.run(inputs).unwrap();
        outputs
            .iter()
            .map(|o| {
                let (shape, data) = out[*o].try_extract_tensor::<f32>().unwrap();
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                ArrayD::from_shape_vec(IxDyn(&shape), data.to_vec()).unwrap()
            })
            .collect()
    }

    /// A base as build_patchcore.py wrote it with its Python heads (`--head`):
    /// `anomaly_map = Add(distance_term, head_term)`, the distance weighed, a
    /// head's logit (here one 1x1 Conv over the features) times `head_weight`,
    /// and the heads' metadata. Fitted versions from before the site head
    /// still look like this.
    fn base_with_a_python_head() -> OnnxModel {
        let mut m = OnnxModel::from_bytes(&fixture("model.onnx")).unwrap();
        let last = m.graph().node.iter().position(|n| n.output.iter().any(|o| o == "anomaly_map")).unwrap();
        let distance = m.graph().node[last].input[0].clone();
        m.add_initializer("distance_weight", &ArrayD::from_elem(IxDyn(&[]), 0.28f32)).unwrap();
        m.add_initializer("head0_c_w", &ArrayD::from_elem(IxDyn(&[1, 66, 1, 1]), 0.01f32)).unwrap();
        m.add_initializer("head_weight", &ArrayD::from_elem(IxDyn(&[]), 1.0f32)).unwrap();
        m.graph_mut().node[last] = node("Add", &["distance_term", "head_term"], &["anomaly_map"], &[]);
        m.add_node("Mul", &[&distance, "distance_weight"], &["distance_term"], &[]);
        m.add_node("Conv", &["features", "head0_c_w"], &["head0_logit"], &[]);
        m.add_node("Mul", &["head0_logit", "head_weight"], &["head_term"], &[]);
        m.set_metadata("pixel_branch", "convolutions 2.. in 8 bits");
        m
    }

    #[test]
    fn initializers_read_and_write_back() {
        let mut m = compose_site_head(&OnnxModel::from_bytes(&fixture("model.onnx")).unwrap()).unwrap();
        let w = m.initializer("distance_weight").unwrap();
        assert_eq!(w.shape(), &[] as &[usize]);
        assert!((w.iter().next().unwrap() - DEFAULT_DISTANCE_WEIGHT).abs() < 1e-6);
        let new = ArrayD::from_elem(IxDyn(&[]), 0.5f32);
        m.set_initializer("distance_weight", &new).unwrap();
        let again = OnnxModel::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(again.initializer("distance_weight").unwrap(), new);
        // Refusals name the problem.
        let missing = m.set_initializer("no_such_weight", &new).unwrap_err().to_string();
        assert!(missing.contains("no_such_weight"), "{missing}");
        let int = m.initializer("nn_rows_shape").unwrap_err().to_string();
        assert!(int.contains("INT64") && int.contains("nn_rows_shape"), "{int}");
        assert!(matches!(m.add_initializer("distance_weight", &new), Err(GraphError::Duplicate(_))));
        assert!(OnnxModel::from_bytes(b"not a model").is_err());
    }

    #[test]
    fn subnormals_are_flushed_to_zero() {
        let mut m = OnnxModel::from_bytes(&fixture("model.onnx")).unwrap();
        let tiny = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1e-40f32, -3e-39, 0.25]).unwrap();
        m.add_initializer("tiny", &tiny).unwrap();
        let flushed = m.flush_subnormals();
        assert!(flushed >= 2);
        assert_eq!(m.initializer("tiny").unwrap().into_raw_vec_and_offset().0, vec![0.0, 0.0, 0.25]);
        assert_eq!(m.flush_subnormals(), 0);
        let composed = compose_site_head(&m).unwrap();
        for t in &composed.graph().initializer {
            if t.data_type == Some(DataType::Float as i32) {
                let v = composed.initializer(t.name()).unwrap();
                assert!(!v.iter().any(|x| x.is_subnormal()), "{} keeps a subnormal", t.name());
            }
        }
    }

    #[test]
    fn the_site_head_replaces_the_python_heads_and_adds_its_logit() {
        let base = base_with_a_python_head();
        assert!(base.graph().node.iter().any(|n| n.output.iter().any(|o| o == "head0_logit")));
        let composed = compose_site_head(&base).unwrap();
        assert!(!composed.graph().node.iter().any(|n| n.output.iter().any(|o| o.starts_with("head0_"))));
        assert!(!composed.has_initializer("head_weight") && !composed.has_initializer("head0_c_w"));
        assert_eq!(composed.output_names(), ["anomaly_map"]);
        assert_eq!(composed.input_names(), ["planes", "memory_bank", "bank_scale"]);
        assert!(composed.metadata("pixel_branch").is_none() && composed.metadata("head").is_some());
        assert_eq!(compose_site_head(&composed).unwrap(), composed, "composing twice changes nothing");

        // Through ONNX Runtime: with the head's weights at 0 and its bias c,
        // the map is the distance term plus c.
        let c = 0.7f32;
        let mut m = composed.clone();
        m.set_initializer(site::B2, &ArrayD::from_elem(IxDyn(&[1]), c)).unwrap();
        m.prune(&["anomaly_map", "distance_term"]).unwrap();
        let mut s = session(&m);
        let bank = Array2::from_shape_fn((16, 66), |(r, c)| ((r * 7 + c * 3) % 11) as f32 * 0.1).into_dyn();
        let scale = Array1::from_elem(16, 1.0f32).into_dyn();
        let out = run(
            &mut s,
            vec![("planes", tiles().into_dyn()), ("memory_bank", bank), ("bank_scale", scale)],
            &["anomaly_map", "distance_term"],
        );
        assert_eq!(out[0].shape(), &[2, 1, 32, 32]);
        let worst = (&out[0] - &out[1]).iter().map(|d| (d - c).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "anomaly_map - distance_term is {c} within {worst}");
        assert!(out[1].iter().any(|d| *d > 0.1), "the distance term is not trivially 0");
    }

    #[test]
    fn a_head_less_base_gets_the_site_head_and_a_weighed_distance() {
        // What build_patchcore.py writes (fixtures/patchcore): the relative
        // distance mapped straight to anomaly_map.
        let headless = OnnxModel::from_bytes(&fixture("model.onnx")).unwrap();
        let last = headless.graph().node.iter().find(|n| n.output.iter().any(|o| o == "anomaly_map")).unwrap();
        assert!(last.op_type() == "Identity" && last.input == ["nn_relative_distance"], "{last:?}");
        assert!(!headless.has_initializer("distance_weight"));

        let composed = compose_site_head(&headless).unwrap();
        assert_eq!(composed.initializer("distance_weight").unwrap().sum(), DEFAULT_DISTANCE_WEIGHT);
        assert_eq!(composed.output_names(), ["anomaly_map"]);
        assert_eq!(compose_site_head(&composed).unwrap(), composed, "composing twice changes nothing");
        assert!(training_graph(&composed).is_ok());

        let c = -1.5f32;
        let mut m = composed;
        m.set_initializer(site::B2, &ArrayD::from_elem(IxDyn(&[1]), c)).unwrap();
        m.prune(&["anomaly_map", "nn_relative_distance"]).unwrap();
        let mut s = session(&m);
        let bank = Array2::from_shape_fn((16, 66), |(r, c)| ((r * 5 + c * 3) % 13) as f32 * 0.1).into_dyn();
        let scale = Array1::from_elem(16, 1.0f32).into_dyn();
        let out = run(
            &mut s,
            vec![("planes", tiles().into_dyn()), ("memory_bank", bank), ("bank_scale", scale)],
            &["anomaly_map", "nn_relative_distance"],
        );
        let want = out[1].mapv(|d| DEFAULT_DISTANCE_WEIGHT * d + c);
        let worst = (&out[0] - &want).iter().fold(0.0f32, |w, d| w.max(d.abs()));
        assert!(worst < 1e-5, "anomaly_map = 0.28 x distance + {c} within {worst}");
    }

    #[test]
    fn the_training_graph_gives_features_and_the_head_input() {
        let composed = compose_site_head(&OnnxModel::from_bytes(&fixture("model.onnx")).unwrap()).unwrap();
        let training = training_graph(&composed).unwrap();
        assert_eq!(training.input_names(), ["planes"], "no memory bank, no bank scale");
        assert_eq!(training.output_names(), ["features", "head_input"]);
        assert!(!training.has_initializer(site::W1));
        assert!(training_graph(&OnnxModel::from_bytes(&fixture("model.onnx")).unwrap()).is_err());

        let planes = tiles().into_dyn();
        let mut s = session(&training);
        assert_eq!(s.inputs().len(), 1);
        let out = run(&mut s, vec![("planes", planes.clone())], &["features", "head_input"]);
        let head_input = &out[1];
        assert_eq!(head_input.shape(), &[2, HEAD_INPUT_CHANNELS, 32, 32]);
        let features = OnnxModel::from_bytes(&fixture("features.onnx")).unwrap();
        let mut fs = session(&features);
        let reference = run(&mut fs, vec![("planes", planes.clone())], &["features"]).remove(0);
        assert_eq!(head_input.slice_axis(Axis(1), (0..66).into()), reference.view(), "channels 0-65 are features");
        assert_eq!(out[0], reference);

        // Spot-check the plane statistics against a direct computation: the
        // densest 8x8 block of the high plane in cell (5, 9) of tile 0, and its mean.
        let p = planes.into_dimensionality::<ndarray::Ix4>().unwrap();
        let cell = p.slice(s![0, 0, 5 * 32..6 * 32, 9 * 32..10 * 32]);
        let blocks: Vec<f32> = (0..4)
            .flat_map(|by| (0..4).map(move |bx| (by, bx)))
            .map(|(by, bx)| cell.slice(s![by * 8..by * 8 + 8, bx * 8..bx * 8 + 8]).mean().unwrap())
            .collect();
        let densest = blocks.iter().copied().fold(f32::MIN, f32::max);
        let mean = blocks.iter().sum::<f32>() / 16.0;
        assert!((head_input[[0, 132, 5, 9]] - densest).abs() < 1e-4);
        assert!((head_input[[0, 136, 5, 9]] - mean).abs() < 1e-4);
        let lightest = blocks.iter().copied().fold(f32::MAX, f32::min);
        assert!((head_input[[0, 134, 5, 9]] - lightest).abs() < 1e-4);
    }
}
