//! The niix tensor core: from a scan's plane bytes to an anomaly map and
//! regions, through ONNX Runtime.
//!
//! - [`decode`]: streaming decoders (raw u16, TIFF, PNG) with bounded memory,
//!   and [`dicos`] for NEMA DICOS DX objects in any lossless transfer syntax.
//! - [`runtime`]: finding and starting ONNX Runtime (`libonnxruntime.so.1.31.1`).
//! - [`manifest`] and [`model`]: a model version and its `model.toml`, checked
//!   against each other at load.
//! - [`repository`]: `models/<name>/<version>/`, newest valid version serves,
//!   hot reload.
//! - [`tiling`]: the tile grid and the stitching rule.
//! - [`orientation`]: which axis a scan's length runs along, and the
//!   transpose into a model's frame.
//! - [`onnx_graph`]: reading and editing a model's ONNX graph (the site
//!   head's weights are written back into it).
//! - [`site_head`]: the site head's trainer (an MLP over ndarray, hand-written
//!   backpropagation and Adam).
//! - [`site_fit`]: `niix model fit --train-head`: training cells from clean
//!   passes, TIP windows and mining, two rounds, the trained graph.
//! - [`tip`]: threat image projection, objects rendered into a site's own
//!   scans in attenuation, with the cell labels the site head trains on.
//! - [`pipeline`]: decode -> transform -> tile -> batch -> run -> stitch ->
//!   threshold -> regions.
//!
//! This crate knows nothing of gRPC or storage: the server hands it readers
//! and gets an [`pipeline::Analysis`] back.

pub mod decode;
pub mod decode_shared;
pub mod dicos;
mod dicos_syntax;
pub mod fit;
pub mod manifest;
pub mod model;
pub mod onnx_graph;
pub mod orientation;
pub mod pipeline;
pub mod regions;
pub mod repository;
pub mod runtime;
pub mod site_fit;
pub mod site_head;
pub mod structure;
pub mod tiling;
pub mod tip;
