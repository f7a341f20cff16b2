//! The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`)
//! over niix's model repository, on the server's gRPC port: stock clients
//! (tritonclient, KServe clients) find which models serve and what planes
//! they read, and analyse a scan's planes without storing it.
//!
//! A model's inputs are its channels, named by the plane kind that feeds them
//! first (`high_energy`, `low_energy`, ...); a tensor named by any kind a
//! channel accepts feeds it (e.g. one `single_energy` plane for a model that
//! takes `high_energy|single_energy`). Each input is one UINT16 plane,
//! shape `[H, W]` or `[1, H, W]`. `ModelInfer` runs the same tensor core as
//! the analysis of pushed scans ([`pipeline::analyze`]) and answers with
//! the anomaly map (FP32), the score, the alarm and the regions.

use std::io::Cursor;
use std::sync::Arc;

use niix_inference::decode::Encoding;
use niix_inference::manifest::PLANE_KINDS;
use niix_inference::model::Model;
use niix_inference::pipeline::{self, AnalysisError, PlaneInput};
use niix_inference::repository::Repository;
use niix_proto::oip::grpc_inference_service_server::GrpcInferenceService;
use niix_proto::oip::model_infer_response::InferOutputTensor;
use niix_proto::oip::model_metadata_response::TensorMetadata;
use niix_proto::oip::repository_index_response::ModelIndex;
use niix_proto::oip::*;
use prost::bytes::Bytes;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, blocking};
use crate::limits::Limits;

/// Largest `ModelInfer` request, in bytes: the whole scan arrives in one
/// message and is held in memory while it is analysed (at most
/// `limits.max_scan_bytes`).
pub const MAX_INFER_REQUEST_BYTES: usize = 256 << 20;

/// The outputs of every model, in answer order: name, datatype, shape.
pub const OUTPUTS: &[(&str, &str, &[i64])] = &[
    // Normalised anomaly score per map cell, `stride` pixels a side.
    ("anomaly_map", "FP32", &[-1, -1]),
    // Highest normalised score, 0..1.
    ("score", "FP32", &[1]),
    // True when a region passed the model's threshold and minimum area.
    ("alarm", "BOOL", &[1]),
    // One row per region, highest score first: x, y, width, height (pixels
    // of the first input), max_score, mean_score.
    ("regions", "FP32", &[-1, 6]),
];

/// The `inference.GRPCInferenceService` of a niix server.
pub struct InferenceService {
    /// The model repository; none when analysis is disabled.
    repo: Option<Arc<Repository>>,
    /// The model that analyses pushed scans (readiness follows it).
    model: Option<String>,
    limits: Limits,
    /// Analyses that run at once (like the analysis workers).
    running: Arc<Semaphore>,
}

impl InferenceService {
    /// Serves `repo`'s models; `workers` analyses run at once, more wait.
    pub fn new(repo: Option<Arc<Repository>>, model: Option<String>, limits: Limits, workers: usize) -> Self {
        InferenceService { repo, model, limits, running: Arc::new(Semaphore::new(workers.max(1))) }
    }

    /// The serving model named `name` (version empty or its own).
    fn model(&self, name: &str, version: &str) -> Result<Arc<Model>> {
        let missing = |why: String| Error::Missing { resource_type: "model", name: name.to_string(), message: why };
        let repo = self.repo.as_ref().ok_or_else(|| missing("analysis is disabled on this server".into()))?;
        let model = repo.get(name).ok_or_else(|| {
            let serving: Vec<String> = repo.serving().iter().map(|m| m.name.clone()).collect();
            missing(format!("no model {name:?} serves; serving: {serving:?} (RepositoryIndex lists them)"))
        })?;
        if !version.is_empty() && version != model.version.to_string() {
            return Err(missing(format!(
                "model {name} serves version {}, not {version:?}; leave the version empty for the serving one",
                model.version
            )));
        }
        Ok(model)
    }
}

/// The input tensors of a model: one per channel, named by the first plane
/// kind the channel accepts.
pub fn model_inputs(model: &Model) -> Vec<TensorMetadata> {
    (0..model.manifest.input.channels.len())
        .map(|c| TensorMetadata {
            name: model.manifest.channel_kinds(c)[0].to_string(),
            datatype: "UINT16".into(),
            shape: vec![-1, -1],
        })
        .collect()
}

/// Turns the request's input tensors into planes, checked against `limits`.
fn planes_of(request: &ModelInferRequest, limits: &Limits) -> Result<Vec<PlaneInput>> {
    let field = |i: usize, f: &str, message: String| Error::InvalidField { field: format!("inputs[{i}].{f}"), message };
    if request.inputs.is_empty() {
        return Err(Error::InvalidField {
            field: "inputs".into(),
            message: "no input tensor: send one UINT16 plane per model input (ModelMetadata lists them)".into(),
        });
    }
    if request.inputs.len() > limits.max_planes as usize {
        return Err(Error::ResourceExhausted(format!(
            "{} input tensors exceed the server's limit of {} planes per scan",
            request.inputs.len(),
            limits.max_planes
        )));
    }
    let raw = !request.raw_input_contents.is_empty();
    if raw && request.raw_input_contents.len() != request.inputs.len() {
        return Err(Error::InvalidField {
            field: "raw_input_contents".into(),
            message: format!(
                "{} raw contents for {} inputs: send one per input, in order",
                request.raw_input_contents.len(),
                request.inputs.len()
            ),
        });
    }
    let mut planes = Vec::with_capacity(request.inputs.len());
    let mut total = 0u64;
    for (i, t) in request.inputs.iter().enumerate() {
        if !PLANE_KINDS.contains(&t.name.as_str()) {
            return Err(field(
                i,
                "name",
                format!("{:?} is not a plane kind; inputs are named {PLANE_KINDS:?}", t.name),
            ));
        }
        if request.inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(field(i, "name", format!("two inputs are named {:?}: send each plane once", t.name)));
        }
        if t.datatype != "UINT16" {
            return Err(field(i, "datatype", format!("{:?}: planes are UINT16", t.datatype)));
        }
        let (h, w) = match t.shape.as_slice() {
            [h, w] | [1, h, w] => (*h, *w),
            other => return Err(field(i, "shape", format!("{other:?}: a plane is [H, W] or [1, H, W]"))),
        };
        if h <= 0 || w <= 0 {
            return Err(field(i, "shape", format!("[{h}, {w}]: height and width must be positive")));
        }
        let max = i64::from(limits.max_dimension);
        if h > max || w > max {
            return Err(Error::ResourceExhausted(format!(
                "input {}: {w}x{h} exceeds the server's limit of {max} pixels per side",
                t.name
            )));
        }
        let pixels = (h * w) as u64;
        if pixels > limits.max_plane_pixels || pixels * 2 > limits.max_plane_bytes {
            return Err(Error::ResourceExhausted(format!(
                "input {}: {pixels} pixels exceed the server's plane limits ({} pixels, {} bytes)",
                t.name, limits.max_plane_pixels, limits.max_plane_bytes
            )));
        }
        total += pixels * 2;
        if total > limits.max_scan_bytes {
            return Err(Error::ResourceExhausted(format!(
                "the inputs exceed the server's limit of {} bytes per scan",
                limits.max_scan_bytes
            )));
        }
        let bytes: Bytes = if raw {
            let b = request.raw_input_contents[i].clone();
            if b.len() as u64 != pixels * 2 {
                return Err(Error::InvalidField {
                    field: format!("raw_input_contents[{i}]"),
                    message: format!("{} bytes for a {w}x{h} UINT16 plane, which takes {}", b.len(), pixels * 2),
                });
            }
            b
        } else {
            let values = t.contents.as_ref().map(|c| c.uint_contents.as_slice()).unwrap_or_default();
            if values.len() as u64 != pixels {
                return Err(field(
                    i,
                    "contents.uint_contents",
                    format!("{} values for a {w}x{h} plane, which has {pixels}", values.len()),
                ));
            }
            if let Some(v) = values.iter().find(|v| **v > u32::from(u16::MAX)) {
                return Err(field(i, "contents.uint_contents", format!("{v} does not fit UINT16")));
            }
            values.iter().flat_map(|v| (*v as u16).to_le_bytes()).collect::<Vec<u8>>().into()
        };
        planes.push(PlaneInput {
            kind: t.name.clone(),
            encoding: Encoding::RawU16Le,
            width: w as u32,
            height: h as u32,
            reader: Box::new(Cursor::new(bytes)),
        });
    }
    Ok(planes)
}

/// What a failed analysis of a client's planes means for the client.
fn analysis_error(e: AnalysisError) -> Error {
    match e {
        e @ (AnalysisError::MissingPlane { .. } | AnalysisError::SizeMismatch(_) | AnalysisError::Decode { .. }) => {
            Error::InvalidField { field: "inputs".into(), message: e.to_string() }
        }
        AnalysisError::TooLarge(m) => Error::ResourceExhausted(m),
        e @ AnalysisError::Runtime(_) => Error::Internal(e.to_string()),
    }
}

fn tensor(name: &str, datatype: &str, shape: Vec<i64>) -> InferOutputTensor {
    InferOutputTensor { name: name.into(), datatype: datatype.into(), shape, ..Default::default() }
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = match (&self.repo, &self.model) {
            (None, _) => false,
            (Some(repo), Some(name)) => repo.get(name).is_some(),
            (Some(repo), None) => !repo.serving().is_empty(),
        };
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = self.model(&r.name, &r.version).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "niix".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["model_repository".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let model = self.model(&r.name, &r.version)?;
        Ok(Response::new(ModelMetadataResponse {
            name: model.name.clone(),
            versions: vec![model.version.to_string()],
            platform: "onnxruntime_onnx".into(),
            inputs: model_inputs(&model),
            outputs: OUTPUTS
                .iter()
                .map(|(n, d, s)| TensorMetadata { name: n.to_string(), datatype: d.to_string(), shape: s.to_vec() })
                .collect(),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let r = request.into_inner();
        let model = self.model(&r.model_name, &r.model_version)?;
        let wanted: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
        if let Some((i, name)) = wanted.iter().enumerate().find(|(_, n)| !OUTPUTS.iter().any(|o| o.0 == **n)) {
            let names: Vec<&str> = OUTPUTS.iter().map(|o| o.0).collect();
            return Err(Error::InvalidField {
                field: format!("outputs[{i}].name"),
                message: format!("no output {name:?}; the outputs are {names:?}"),
            }
            .into());
        }
        let planes = planes_of(&r, &self.limits)?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Unavailable("the server is stopping".into()))?;
        let run = model.clone();
        // The permit goes with the analysis: a client that gives up does not
        // free it while ONNX Runtime still works for it.
        let a = blocking(move || {
            let _running = running;
            pipeline::analyze(&run, planes).map_err(analysis_error)
        })
        .await?;

        let mut outputs = Vec::new();
        let mut raw = Vec::new();
        for (name, datatype, _) in OUTPUTS {
            if !wanted.is_empty() && !wanted.contains(name) {
                continue;
            }
            let (shape, bytes) = match *name {
                "anomaly_map" => {
                    let (h, w) = a.map.dim();
                    (vec![h as i64, w as i64], f32_bytes(a.map.iter().copied()))
                }
                "score" => (vec![1], f32_bytes([a.score])),
                "alarm" => (vec![1], vec![u8::from(a.alarm)]),
                _ => (
                    vec![a.regions.len() as i64, 6],
                    f32_bytes(a.regions.iter().flat_map(|g| {
                        [g.x as f32, g.y as f32, g.width as f32, g.height as f32, g.max_score, g.mean_score]
                    })),
                ),
            };
            outputs.push(tensor(name, datatype, shape));
            raw.push(bytes);
        }
        let parameters = [(
            "stride".to_string(),
            InferParameter { parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(a.stride as i64)) },
        )]
        .into_iter()
        .collect();
        Ok(Response::new(ModelInferResponse {
            model_name: model.name.clone(),
            model_version: model.version.to_string(),
            id: r.id,
            parameters,
            outputs,
            raw_output_contents: raw,
        }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let r = request.into_inner();
        let Some(repo) = &self.repo else { return Ok(Response::new(RepositoryIndexResponse::default())) };
        let mut models: Vec<ModelIndex> = repo
            .serving()
            .iter()
            .map(|m| ModelIndex {
                name: m.name.clone(),
                version: m.version.to_string(),
                state: "READY".into(),
                reason: String::new(),
            })
            .collect();
        if !r.ready {
            models.extend(repo.refused().into_iter().map(|(path, why)| ModelIndex {
                name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                version: String::new(),
                state: "UNAVAILABLE".into(),
                reason: why,
            }));
        }
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}
