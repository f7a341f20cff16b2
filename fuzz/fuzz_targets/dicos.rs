//! Arbitrary bytes as a NEMA DICOS DX object (see `niix_fuzz::dicos_object`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| niix_fuzz::dicos_object(data));
