//! Arbitrary bytes as a pushed `ScanHeader`, a scan id and a container
//! number (see `niix_fuzz::scan_header`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| niix_fuzz::scan_header(data));
