//! The tensor core with real ONNX models from fixtures/ through the real
//! ONNX Runtime: manifest checks, stitching, regions, hot reload.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use niix_inference::decode::Encoding;
use niix_inference::model::{Model, ModelError};
use niix_inference::orientation::{LengthAxis, transpose, transposed};
use niix_inference::pipeline::{PlaneInput, Timings, analyze, analyze_oriented, model_input, model_input_oriented};
use niix_inference::regions::Region;
use niix_inference::repository::Repository;
use niix_inference::runtime::Threads;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn threads() -> Threads {
    Threads { intra_op: 1, inter_op: 1 }
}

fn load(rel: &str, name: &str) -> Result<Model, ModelError> {
    Model::load(&fixtures().join(rel), name, 1, threads())
}

fn raw_plane(kind: &str, w: u32, h: u32, px: &[u16]) -> PlaneInput {
    let bytes: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
    PlaneInput {
        kind: kind.into(),
        encoding: Encoding::RawU16Le,
        width: w,
        height: h,
        reader: Box::new(Cursor::new(bytes)),
    }
}

fn pattern(w: u32, h: u32) -> Vec<u16> {
    (0..w * h).map(|i| (i.wrapping_mul(2654435761) >> 16) as u16).collect()
}

/// Copies a fixture version directory into `dst`.
fn copy_version(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["model.onnx", "model.toml"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

#[test]
fn identity_stitching_reproduces_every_pixel_once() {
    let model = load("test-models/identity/1", "identity").unwrap();
    assert_eq!(model.stride, 1);
    for (w, h) in [(333, 150), (64, 64), (65, 200), (30, 20), (1, 1)] {
        let px = pattern(w, h);
        let a = analyze(&model, vec![raw_plane("single_energy", w, h, &px)]).unwrap();
        assert_eq!(a.map.dim(), (h as usize, w as usize));
        for (i, (&got, &v)) in a.map.iter().zip(&px).enumerate() {
            let want = (f32::from(v) - 0.0) * (1.0 / 65535.0);
            assert_eq!(got, want, "{w}x{h}: pixel {i} ({}, {})", i as u32 % w, i as u32 / w);
        }
    }
}

#[test]
fn stitching_at_a_map_stride_places_each_cell() {
    let model = load("test-models/pool4/1", "pool4").unwrap();
    assert_eq!(model.stride, 4);
    let (w, h) = (212u32, 150u32);
    let px: Vec<u16> = (0..w * h).map(|i| ((i % w) * 300 + (i / w) * 7) as u16).collect();
    let a = analyze(&model, vec![raw_plane("single_energy", w, h, &px)]).unwrap();
    assert_eq!(a.map.dim(), (38, 53));
    // Every cell that lies wholly inside the image is the mean of its 4x4 block.
    for my in 0..(h as usize / 4) {
        for mx in 0..(w as usize / 4) {
            let mut sum = 0.0f64;
            for y in 0..4 {
                for x in 0..4 {
                    sum += f64::from(px[(my * 4 + y) * w as usize + mx * 4 + x]);
                }
            }
            let want = (sum / 16.0 / 65535.0) as f32;
            assert!((a.map[[my, mx]] - want).abs() < 1e-5, "cell ({mx}, {my}): {} vs {want}", a.map[[my, mx]]);
        }
    }
}

#[test]
fn a_dense_blob_becomes_one_region_around_it() {
    let model = load("models/demo-local-contrast/1", "demo-local-contrast").unwrap();
    let (w, h) = (1500u32, 700u32);
    // Open cargo at 30000 counts with mild texture; a 48x40 dense block at (903, 211).
    let (bx, by, bw, bh) = (903u32, 211u32, 48u32, 40u32);
    let mut px: Vec<u16> = (0..w * h).map(|i| 30000 + (i.wrapping_mul(7919) % 97) as u16).collect();
    for y in by..by + bh {
        for x in bx..bx + bw {
            px[(y * w + x) as usize] = 3000;
        }
    }
    let low: Vec<u16> = px.iter().map(|v| v / 2).collect();
    let a = analyze(&model, vec![raw_plane("high_energy", w, h, &px), raw_plane("low_energy", w, h, &low)]).unwrap();
    assert!(a.alarm);
    assert_eq!(a.regions.len(), 1, "{:?}", a.regions);
    let r = &a.regions[0];
    assert!(r.x <= bx && r.y <= by && r.x + r.width >= bx + bw && r.y + r.height >= by + bh, "{r:?}");
    assert!(r.width < bw + 40 && r.height < bh + 40, "the box stays tight: {r:?}");
    assert!(a.score > 0.5 && r.max_score == a.score);

    // The same scan without the block is clear.
    let flat: Vec<u16> = (0..w * h).map(|i| 30000 + (i.wrapping_mul(7919) % 97) as u16).collect();
    let a = analyze(&model, vec![raw_plane("single_energy", w, h, &flat)]).unwrap();
    assert!(!a.alarm && a.regions.is_empty(), "{:?}", a.regions);
}

/// A scan stored with its length along x (the planes transposed) is
/// analysed in the model's frame (`length_along = "y"`): its model input is
/// bit for bit the tall scan's, so its map is exactly the tall scan's
/// transposed and its regions the same with x and y swapped.
#[test]
fn a_scan_stored_across_gives_the_map_transposed_and_the_regions_swapped() {
    let model = load("models/demo-local-contrast/1", "demo-local-contrast").unwrap();
    assert_eq!(model.manifest.input.length_along, LengthAxis::Y);
    // Tall, as the model's scans: 700 wide, 1500 high, two dense blocks.
    let (w, h) = (700u32, 1500u32);
    let mut high: Vec<u16> = (0..w * h).map(|i| 30000 + (i.wrapping_mul(7919) % 97) as u16).collect();
    for (bx, by, bw, bh) in [(211u32, 903u32, 40u32, 48u32), (500, 100, 64, 30)] {
        for y in by..by + bh {
            for x in bx..bx + bw {
                high[(y * w + x) as usize] = 3000 + x as u16;
            }
        }
    }
    let low: Vec<u16> = high.iter().map(|v| v / 2 + 7).collect();
    let planes = |high: &[u16], low: &[u16], (w, h): (u32, u32)| {
        vec![raw_plane("high_energy", w, h, high), raw_plane("low_energy", w, h, low)]
    };
    let across = |p: &[u16]| transpose(p, h as usize, w as usize);
    let (wide_high, wide_low) = (across(&high), across(&low));

    let tall = analyze(&model, planes(&high, &low, (w, h))).unwrap();
    assert!(!tall.transposed && tall.regions.len() == 2, "{:?}", tall.regions);
    for stated in [Some(LengthAxis::X), None] {
        // Stated, or taken from the longer side.
        let wide = analyze_oriented(&model, planes(&wide_high, &wide_low, (h, w)), stated).unwrap();
        assert!(wide.transposed, "{stated:?}");
        assert_eq!(wide.map, transposed(&tall.map), "{stated:?}");
        assert!(wide.map.is_standard_layout());
        assert_eq!((wide.score, wide.raw_score, wide.alarm), (tall.score, tall.raw_score, tall.alarm));
        let swapped: Vec<_> = tall
            .regions
            .iter()
            .map(|r| Region { x: r.y, y: r.x, width: r.height, height: r.width, ..r.clone() })
            .collect();
        assert_eq!(wide.regions, swapped, "{stated:?}");
    }
    // A wide scan said to run along y is analysed as it is stored.
    let as_stored = analyze_oriented(&model, planes(&wide_high, &wide_low, (h, w)), Some(LengthAxis::Y)).unwrap();
    assert!(!as_stored.transposed);
    assert_eq!(as_stored.map.dim(), (tall.map.ncols(), tall.map.nrows()));

    // The whole model input, as the fit decodes it: the tall scan's, bit for bit.
    let m = &model.manifest;
    let mut timings = Timings::default();
    let want = model_input(m, &mut planes(&high, &low, (w, h)), &mut timings).unwrap();
    let got =
        model_input_oriented(m, &mut planes(&wide_high, &wide_low, (h, w)), Some(LengthAxis::X), &mut timings).unwrap();
    assert!(got.transposed && !want.transposed);
    assert_eq!((got.size, got.planes.clone(), got.pad.clone()), (want.size, want.planes.clone(), want.pad.clone()));
    assert!(got.data == want.data, "the transposed input differs from the tall scan's");
}

#[test]
fn a_scan_without_the_planes_a_model_needs_is_refused() {
    let model = load("models/demo-local-contrast/1", "demo-local-contrast").unwrap();
    let e = analyze(&model, vec![raw_plane("z_effective", 4, 4, &[0; 16])]).unwrap_err().to_string();
    assert!(e.contains("high_energy|single_energy"), "{e}");
    let e = analyze(&model, vec![raw_plane("high_energy", 4, 4, &[0; 16]), raw_plane("low_energy", 2, 8, &[0; 16])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("differ in size"), "{e}");
}

fn refused_with(manifest_edit: impl Fn(String) -> String, onnx: Option<&[u8]>, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("identity/1");
    copy_version(&fixtures().join("test-models/identity/1"), &v);
    let text = std::fs::read_to_string(v.join("model.toml")).unwrap();
    std::fs::write(v.join("model.toml"), manifest_edit(text)).unwrap();
    if let Some(bytes) = onnx {
        std::fs::write(v.join("model.onnx"), bytes).unwrap();
    }
    let e = Model::load(&v, "identity", 1, threads()).unwrap_err().to_string();
    assert!(e.contains(needle), "{needle:?} not in {e}");
}

#[test]
fn manifests_that_do_not_fit_the_model_are_refused() {
    refused_with(
        |t| t.replace("name = \"x\"", "name = \"planes\""),
        None,
        "no input \"planes\"; the model's inputs are [\"x\"]",
    );
    refused_with(|t| t.replace("name = \"y\"", "name = \"map\""), None, "no output \"map\"");
    refused_with(
        |t| t.replace("channels = [\"high_energy|single_energy\"]", "channels = [\"high_energy\", \"low_energy\"]"),
        None,
        "float32 [N, 2, 64, 64]",
    );
    refused_with(|t| t.replace("name = \"identity\"", "name = \"other\""), None, "directory is \"identity\"");
    refused_with(|t| t.replace("overlap = 16", "overlap = 15"), None, "must be even");
    refused_with(|t| t, Some(b"this is not an ONNX model"), "cannot load model.onnx");
    refused_with(|t| t, Some(&[]), "cannot load model.onnx");
}

#[test]
fn every_graph_input_of_a_fitted_detector_must_be_fed() {
    // The bundled detector's graph takes memory_bank and bank_scale beside
    // the planes. A manifest that forgets one is refused at load, rather
    // than failing every scan at run time.
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("cargo-patchcore/1");
    std::fs::create_dir_all(&v).unwrap();
    let src = fixtures().join("models/cargo-patchcore/1");
    for f in ["model.onnx", "model.toml", "memory_bank.f32", "bank_scale.f32", "structure.f32"] {
        std::fs::copy(src.join(f), v.join(f)).unwrap();
    }
    let model = Model::load(&v, "cargo-patchcore", 1, threads()).unwrap();
    assert_eq!(model.stride, 32);
    let text = std::fs::read_to_string(v.join("model.toml")).unwrap();
    let rows = std::fs::metadata(v.join("bank_scale.f32")).unwrap().len() / 4;
    let block = format!("[[constants]]\nname = \"bank_scale\"\nfile = \"bank_scale.f32\"\nshape = [{rows}]\n");
    assert!(text.contains(&block), "{text}");
    let forgot = text.replace(&block, "").replace("bank_scale = \"bank_scale\"\n", "");
    std::fs::write(v.join("model.toml"), forgot).unwrap();
    let e = Model::load(&v, "cargo-patchcore", 1, threads()).unwrap_err().to_string();
    assert!(e.contains("takes input \"bank_scale\", which neither"), "{e}");
}

#[test]
fn the_newest_valid_version_serves_and_hot_reload_follows_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let identity = fixtures().join("test-models/identity");
    copy_version(&identity.join("1"), &root.join("identity/1"));
    let repo = Repository::new(root, threads());
    let report = repo.reload();
    assert_eq!(report.loaded.len(), 1);
    assert_eq!(repo.get("identity").unwrap().version, 1);

    // A new version appears: picked up on the next reload.
    copy_version(&identity.join("2"), &root.join("identity/2"));
    let report = repo.reload();
    assert_eq!(report.loaded.len(), 1, "{report:?}");
    assert_eq!(repo.get("identity").unwrap().version, 2);

    // A broken version 3: refused, version 2 keeps serving, and it is not retried.
    std::fs::create_dir_all(root.join("identity/3")).unwrap();
    std::fs::copy(identity.join("2/model.toml"), root.join("identity/3/model.toml")).unwrap();
    std::fs::write(root.join("identity/3/model.onnx"), b"\x08\x07garbage").unwrap();
    let report = repo.reload();
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert_eq!(repo.get("identity").unwrap().version, 2);
    assert!(repo.reload().refused.is_empty(), "a refused version is not retried until its files change");
    assert_eq!(repo.refused().len(), 1);

    // Fixed: served.
    std::fs::copy(identity.join("2/model.onnx"), root.join("identity/3/model.onnx")).unwrap();
    std::fs::write(
        root.join("identity/3/model.toml"),
        std::fs::read_to_string(identity.join("2/model.toml")).unwrap() + "\n",
    )
    .unwrap();
    repo.reload();
    assert_eq!(repo.get("identity").unwrap().version, 3);

    // A fresh repository whose newest version is broken serves the one before.
    let other = tempfile::tempdir().unwrap();
    copy_version(&identity.join("1"), &other.path().join("identity/1"));
    std::fs::create_dir_all(other.path().join("identity/2")).unwrap();
    std::fs::write(other.path().join("identity/2/model.onnx"), b"").unwrap();
    let repo = Repository::new(other.path(), threads());
    repo.reload();
    assert_eq!(repo.get("identity").unwrap().version, 1);
}

#[test]
fn the_model_identity_is_its_file_digest() {
    let model = load("test-models/identity/1", "identity").unwrap();
    let bytes = std::fs::read(fixtures().join("test-models/identity/1/model.onnx")).unwrap();
    use sha2::Digest;
    assert_eq!(model.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
}
