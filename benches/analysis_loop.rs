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
    /// Keep the scan's two TIFFs in this directory, and reuse them when they
    /// are there (so a profile of the loop is not mostly `niix synth`).
    #[arg(long)]
    scan_dir: Option<std::path::PathBuf>,
}

fn main() {
    let a = Args::parse();
    let tmp = tempfile::tempdir_in(workspace().join("target")).expect("temp dir");
    let dir = a.scan_dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let (high, low) = match (dir.join("high.tif"), dir.join("low.tif")) {
        (h, l) if h.is_file() && l.is_file() => (h, l),
        (h, l) => {
            std::fs::create_dir_all(&dir).expect("scan dir");
            let options = niix_synth::Options { anomaly_rate: 1.0, ..Default::default() };
            let (sh, sl) = synth_planes(&dir, 1, 0, &options);
            std::fs::rename(sh, &h).expect("renaming the high plane");
            std::fs::rename(sl, &l).expect("renaming the low plane");
            (h, l)
        }
    };
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
