//! The niix tensor core.
//!
//! Today it holds [`decode`]: streaming decoders that turn a plane's bytes
//! (raw little-endian u16, TIFF, PNG) into rows of 16-bit samples with
//! bounded memory. The server uses them to validate pushed planes; the
//! analysis pipeline (intensity transform, tiling, ONNX Runtime, stitching,
//! post-processing) builds on the same decoders.

pub mod decode;
