//! Runs niix's analysis of one synthetic 2048x6144 dual-energy scan in a
//! loop, for a profiler (`perf record`, `valgrind --tool=callgrind`): prints
//! each run's stage timings and its time outside ONNX Runtime.
//!
//!     cargo build --release -p niix-benches --bin analysis_loop
//!     perf record -g target/release/analysis_loop --model demo-local-contrast --runs 10

use std::time::Instant;

use clap::Parser;
use niix_benches::{synth_planes, workspace};
use niix_inference::decode::Encoding;
use niix_inference::model::Model;
use niix_inference::pipeline::{PlaneInput, analyze};
use niix_inference::runtime::Threads;

#[derive(Parser)]
struct Args {
    /// Model of fixtures/models (version 1).
    #[arg(long, default_value = "cargo-patchcore")]
    model: String,
    /// Analyses to run.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn main() {
    let a = Args::parse();
    let dir = tempfile::tempdir_in(workspace().join("target")).expect("temp dir");
    let (high, low) = synth_planes(dir.path(), 1, 0, &niix_synth::Options { anomaly_rate: 1.0, ..Default::default() });
    let model =
        Model::load(&workspace().join(format!("fixtures/models/{}/1", a.model)), &a.model, 1, Threads::default())
            .expect("a bundled model");
    for _ in 0..a.runs {
        let planes = [(&high, "high_energy"), (&low, "low_energy")]
            .into_iter()
            .map(|(p, kind)| PlaneInput {
                kind: kind.into(),
                encoding: Encoding::Tiff,
                width: 2048,
                height: 6144,
                reader: Box::new(std::io::BufReader::new(std::fs::File::open(p).expect("plane file"))),
            })
            .collect();
        let t0 = Instant::now();
        let r = analyze(&model, planes).expect("analysis");
        let t = r.timings;
        println!(
            "total {:.3} s, outside ONNX Runtime {:.3} s (decode {:.3}, tile {:.3}, infer {:.3}, stitch {:.3}, postprocess {:.3}), score {:.4}, {} regions",
            t0.elapsed().as_secs_f64(),
            (t.total - t.infer).as_secs_f64(),
            t.decode.as_secs_f64(),
            t.tile.as_secs_f64(),
            t.infer.as_secs_f64(),
            t.stitch.as_secs_f64(),
            t.postprocess.as_secs_f64(),
            r.score,
            r.regions.len()
        );
    }
}
