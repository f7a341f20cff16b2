//! Arbitrary bytes as a result package from a partner (see
//! `niix_fuzz::package_verify`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| niix_fuzz::package_verify(data));
