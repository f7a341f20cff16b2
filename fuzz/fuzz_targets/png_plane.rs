//! Arbitrary bytes as a PNG plane: probe, then decode every row under
//! small limits (see `niix_fuzz::plane`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use niix_inference::decode::Encoding;

fuzz_target!(|data: &[u8]| niix_fuzz::plane(data, Encoding::Png));
