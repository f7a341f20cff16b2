//! The `niix` command line against a real server: push (TIFF, PNG, raw),
//! duplicate detection, listing, restart persistence.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn niix(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_niix")).args(args).env("NIIX_LOG", "warn").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[tokio::test]
async fn push_list_duplicate_and_restart_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let high = file(dir.path(), "scan.high.tif");
    let low = file(dir.path(), "scan.low.png");
    let raw = file(dir.path(), "plane.raw");
    let high_bytes = write_tiff(&high, 256, 768, 1);
    let low_bytes = write_png(&low, 256, 768, 2);
    let raw_plane = raw_bytes(300, 200, 3);
    std::fs::write(&raw, &raw_plane).unwrap();

    let server = Server::spawn(&data).await;
    let url = server.url.clone();
    let s = |v: &str| v.to_string();
    let push_args = [
        s("push"),
        high.display().to_string(),
        s("--low-energy"),
        low.display().to_string(),
        s("--server"),
        url.clone(),
        s("--site"),
        s("NLRTM-01"),
        s("--container"),
        s("CSQU3054383"),
        s("--scan-time"),
        s("2026-11-23T08:00:00Z"),
        s("--json"),
    ];
    let push_args: Vec<&str> = push_args.iter().map(String::as_str).collect();
    let (ok, out, err) = niix(&push_args);
    assert!(ok, "{err}");
    let receipt = &json_lines(&out)[0];
    assert_eq!(receipt["duplicate"], false);
    assert_eq!(receipt["planes"][0]["sha256"], sha256(&high_bytes));
    assert_eq!(receipt["planes"][1]["sha256"], sha256(&low_bytes));
    assert_eq!(receipt["planes"][1]["bytes"], low_bytes.len());
    let id = receipt["scan_id"].as_str().unwrap().to_string();

    // The same command again names the same scan: a duplicate.
    let (ok, out, err) = niix(&push_args);
    assert!(ok, "{err}");
    let again = &json_lines(&out)[0];
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["scan_id"], id.as_str());

    // Without --scan-time or --scan-id, a repeated push is still recognised.
    let plain = ["push", low.to_str().unwrap(), "--server", &url, "--json"];
    let (ok, out, err) = niix(&plain);
    assert!(ok, "{err}");
    assert_eq!(json_lines(&out)[0]["duplicate"], false);
    let (ok, out, err) = niix(&plain);
    assert!(ok, "{err}");
    assert_eq!(json_lines(&out)[0]["duplicate"], true);

    // A raw plane needs its size.
    let (ok, _, err) = niix(&["push", raw.to_str().unwrap(), "--server", &url, "--json"]);
    assert!(!ok && err.contains("--width"), "{err}");
    let (ok, out, err) =
        niix(&["push", raw.to_str().unwrap(), "--width", "300", "--height", "200", "--server", &url, "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json_lines(&out)[0]["planes"][0]["sha256"], sha256(&raw_plane));

    // A bad container number is refused with the server's reason.
    let (ok, _, err) = niix(&["push", high.to_str().unwrap(), "--container", "CSQU3054384", "--server", &url]);
    assert!(!ok);
    assert!(err.contains("InvalidArgument") && err.contains("check digit"), "{err}");

    // Findings: --wait blocks until the analysis is done.
    let (ok, out, err) = niix(&["findings", &id, "--server", &url, "--wait", "--json"]);
    assert!(ok, "{err}");
    let f = &json_lines(&out)[0];
    assert_eq!(f["scan_id"], id.as_str());
    assert_eq!(f["status"], "analyzed");
    assert!(["alarm", "clear"].contains(&f["decision"].as_str().unwrap()), "{f}");
    assert_eq!(f["model"]["name"], "demo-local-contrast");
    assert_eq!(f["model"]["sha256"].as_str().unwrap().len(), 64);
    assert!(f["regions"].is_array() && f["score"].is_number());
    let (ok, out, _) = niix(&["findings", &id, "--server", &url]);
    assert!(ok && out.contains("DEMO model"), "{out}");

    // push --wait prints the receipt with the findings.
    let (ok, out, err) = niix(&[
        "push",
        raw.to_str().unwrap(),
        "--width",
        "300",
        "--height",
        "200",
        "--site",
        "X",
        "--server",
        &url,
        "--wait",
        "--json",
    ]);
    assert!(ok, "{err}");
    let r = &json_lines(&out)[0];
    assert_eq!(r["findings"]["status"], "analyzed");
    assert!(r["findings"]["regions"].is_array());

    server.kill9();
    let server = Server::spawn(&data).await;
    let (ok, out, err) = niix(&["scans", "--server", &server.url, "--json"]);
    assert!(ok, "{err}");
    let scans = json_lines(&out);
    assert_eq!(scans.len(), 4);
    let ours = scans.iter().find(|s| s["scan_id"] == id.as_str()).expect("the TIFF scan is listed");
    assert!(["queued", "analyzing", "analyzed"].contains(&ours["status"].as_str().unwrap()), "{ours}");
    assert_eq!(ours["site_id"], "NLRTM-01");
    assert!(ours["received_at"].as_str().unwrap().starts_with("20"), "{ours}");
    server.kill9();
}

#[test]
fn a_client_with_no_server_says_so() {
    let (ok, _, err) = niix(&["scans", "--server", "http://127.0.0.1:9"]);
    assert!(!ok);
    assert!(err.contains("cannot reach niix server"), "{err}");
}

#[test]
fn serve_refuses_a_public_address_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = niix(&["serve", "--listen", "0.0.0.0:0", "--data", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("--insecure"), "{err}");
}

/// An overlay that would be larger than a stock client's 4 MiB message (a
/// noisy full-width scan's) is narrowed by the server to fit, and
/// `niix overlay` says so.
#[tokio::test]
async fn overlay_of_noise_at_full_width_is_narrowed_to_fit_a_stock_client() {
    let dir = tempfile::tempdir().unwrap();
    let high = file(dir.path(), "noisy.high.tif");
    // Noise does not compress: 1600x1200 RGB would be 5.8 MB of PNG.
    write_tiff(&high, 1600, 1200, 7);
    let server = Server::spawn(&dir.path().join("data")).await;
    let (ok, out, err) = niix(&["push", high.to_str().unwrap(), "--server", &server.url, "--json"]);
    assert!(ok, "{err}");
    let id = json_lines(&out)[0]["scan_id"].as_str().unwrap().to_string();
    let png = dir.path().join("overlay.png");
    let (ok, _, err) =
        niix(&["overlay", &id, "-o", png.to_str().unwrap(), "--max-width", "1600", "--server", &server.url]);
    assert!(ok, "{err}");
    assert!(err.contains("narrower than --max-width 1600"), "{err}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() <= 4 << 20, "the overlay must fit a 4 MiB response, got {} bytes", bytes.len());
    let decoded = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
    let (w, h) = (decoded.info().width, decoded.info().height);
    assert!(w < 1600 && w > 800, "narrowed to {w}x{h}");
    assert!((i64::from(h) - i64::from(1200 * w / 1600)).abs() <= 1, "the aspect ratio is kept ({w}x{h})");
}

#[test]
fn a_material_calibration_is_fitted_to_a_scan_of_step_wedges() {
    use niix_synth::physics::{self, HIGH, LOW};
    use niix_synth::rng::Rng;
    // Seven steps each of water, aluminium and steel (one row of steps per
    // material, 40x40 pixels each) and open beam on the right, exposed on
    // niix synth's 6/4 MV scanner with its counting noise.
    let (step, steps) = (40usize, 7usize);
    let (len, hgt) = (step * (steps + 1), 3 * step);
    let mut layers = [vec![0f32; len * hgt], vec![0f32; len * hgt], vec![0f32; len * hgt]];
    // Rows of water (layer 1), aluminium (layer 2) and steel (layer 0), in g/cm2 per step.
    for (row, (layer, per_step)) in [(1usize, 12.0f32), (2, 12.0), (0, 8.0)].into_iter().enumerate() {
        for y in row * step..(row + 1) * step {
            for x in 0..steps * step {
                layers[layer][y * len + x] = per_step * (1 + x / step) as f32;
            }
        }
    }
    let gain = vec![1.0; hgt];
    let raw = |s| -> Vec<u8> {
        let layers = [layers[0].as_slice(), layers[1].as_slice(), layers[2].as_slice()];
        physics::expose(s, layers, len, &gain, &mut Rng::new(5, 0)).iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let (high, low) = (dir.path().join("wedges.high.raw"), dir.path().join("wedges.low.raw"));
    std::fs::write(&high, raw(HIGH)).unwrap();
    std::fs::write(&low, raw(LOW)).unwrap();
    let rects = |row: usize| -> Vec<String> {
        (0..steps)
            .flat_map(|i| {
                [
                    "--".to_string() + ["organic", "mixed", "inorganic"][row],
                    format!("{},{},30,30", i * step + 5, row * step + 5),
                ]
            })
            .collect()
    };
    let (w, h) = (len.to_string(), hgt.to_string());
    let mut args: Vec<String> =
        ["materials", "calibrate", "--high", high.to_str().unwrap(), "--low", low.to_str().unwrap()]
            .iter()
            .chain(&["--width", &w, "--height", &h, "--name", "lane 3 linac", "--model", "L-6", "--air"])
            .map(|s| s.to_string())
            .collect();
    args.push(format!("{},5,30,100", steps * step + 5));
    args.extend(rects(0).into_iter().chain(rects(1)).chain(rects(2)));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = niix(&refs);
    assert!(ok, "{err}");

    // The printed entry is a valid config section, close to the built-in
    // calibration of the same physics.
    let config: niix::config::Config = toml::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let c = &config.web.materials[0];
    assert_eq!((c.name.as_str(), c.model.as_str()), ("lane 3 linac", "L-6"));
    let b = niix::material::Calibration::builtin();
    for p in [0.5, 2.0, 4.0] {
        for (x, y) in [(c.organic, b.organic), (c.mixed, b.mixed), (c.inorganic, b.inorganic)] {
            assert!((x.at(p) - y.at(p)).abs() < 0.01, "at {p}: {x:?} against {y:?}\n{out}{err}");
        }
    }

    // One step per material cannot give a line; a rectangle off the plane is named.
    let one: Vec<&str> = refs.iter().copied().take_while(|a| *a != "--organic").collect();
    let (ok, _, err) =
        niix(&[&one[..], &["--organic", "5,5,30,30", "--mixed", "5,45,30,30", "--inorganic", "5,85,30,30"]].concat());
    assert!(!ok && err.contains("range of thicknesses"), "{err}");
    let (ok, _, err) =
        niix(&[&one[..], &["--organic", "300,5,30,30", "--mixed", "5,45,30,30", "--inorganic", "5,85,30,30"]].concat());
    assert!(!ok && err.contains("lies outside the 320x120 plane"), "{err}");
}
