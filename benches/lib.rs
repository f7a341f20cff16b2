//! Shared inputs of the niix benchmarks: scans, a `niix serve` child, and
//! latency percentiles.

use std::ffi::OsString;
use std::io::Cursor;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use niix::client::{PlaneHints, describe_plane};
use niix_inference::decode::Encoding;
use niix_inference::pipeline::PlaneInput;
use niix_proto::v1::{PlaneKind, ScanHeader, ScanMetadata};

/// The repository's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The repository's fixtures/ directory.
pub fn fixtures() -> PathBuf {
    workspace().join("fixtures")
}

/// Width and height of the reference scan (a 20-foot container at ~3 mm).
pub const SCAN: (u32, u32) = (2048, 6144);

/// 16-bit samples of a textured cargo scene with a few dense blocks.
/// `low` gives the low-energy plane (more attenuation).
pub fn cargo_plane(w: u32, h: u32, low: bool) -> Vec<u16> {
    (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let wall = 2000 * u32::from((x / 7) % 2 == 0);
            let block = u32::from((x / 300 + y / 500) % 7 == 0) * 18000;
            let v = 40000u32.saturating_sub(wall + block) + (i.wrapping_mul(2654435761) >> 22);
            (if low { v * 3 / 5 } else { v }).min(65535) as u16
        })
        .collect()
}

/// The plane as an uncompressed 16-bit TIFF (64 rows per strip).
pub fn tiff_bytes(w: u32, h: u32, px: &[u16]) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    let mut enc = tiff::encoder::TiffEncoder::new(&mut buf).expect("in-memory TIFF");
    let mut img = enc.new_image::<tiff::encoder::colortype::Gray16>(w, h).expect("in-memory TIFF");
    img.rows_per_strip(64).expect("in-memory TIFF");
    img.write_data(px).expect("in-memory TIFF");
    buf.into_inner()
}

/// A dual-energy scan as pipeline input, from TIFF bytes.
pub fn dual_energy(high: &[u8], low: &[u8]) -> Vec<PlaneInput> {
    let (w, h) = SCAN;
    [("high_energy", high), ("low_energy", low)]
        .into_iter()
        .map(|(kind, bytes)| PlaneInput {
            kind: kind.into(),
            encoding: Encoding::Tiff,
            width: w,
            height: h,
            reader: Box::new(Cursor::new(bytes.to_vec())),
        })
        .collect()
}

/// A synthetic dual-energy scan (`niix_synth`, series `seed`, number `index`)
/// written as TIFFs into `dir`; returns the high- and low-energy files.
pub fn synth_planes(dir: &Path, seed: u64, index: u64, options: &niix_synth::Options) -> (PathBuf, PathBuf) {
    let scan = niix_synth::generate(seed, index, options);
    niix_synth::write(dir, &scan).expect("writing the scan");
    let name = &scan.info.name;
    (dir.join(format!("{name}.high.tif")), dir.join(format!("{name}.low.tif")))
}

/// A header with a fresh random scan id for plane `files`, site `BENCH`.
/// The plane hashes are left out: the server computes them.
pub fn scan_header(files: &[(&Path, PlaneKind)], hints: &PlaneHints) -> ScanHeader {
    let planes = files
        .iter()
        .map(|(p, k)| {
            let mut d = describe_plane(p, *k, hints).expect("describing a plane");
            d.sha256.clear(); // the server hashes; the client does not pre-hash here
            d
        })
        .collect();
    ScanHeader {
        scan_id: uuid::Uuid::new_v4().to_string(),
        metadata: Some(ScanMetadata { site_id: "BENCH".into(), ..Default::default() }),
        planes,
    }
}

/// The `q` quantile (0..=1) of sorted latencies, in milliseconds (0 when empty).
pub fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// The release `niix` binary: `NIIX_BIN`, else `target/release/niix`.
pub fn niix_bin() -> PathBuf {
    std::env::var_os("NIIX_BIN").map(PathBuf::from).unwrap_or_else(|| workspace().join("target/release/niix"))
}

/// `niix serve` as a child process on a free loopback port (for its
/// resident memory, apart from the benchmark's own). Killed when dropped.
pub struct Serve {
    child: Child,
    /// Its gRPC URL.
    pub url: String,
}

impl Serve {
    /// `niix serve --config DATA/niix.toml --data DATA <args>` with `config` as
    /// the file's text, once its port accepts connections. Its log (warnings
    /// and errors) goes to `DATA/serve.log`. ONNX Runtime is the checkout's
    /// (`.niix/onnxruntime/`) unless `ORT_DYLIB_PATH` says otherwise.
    pub fn start(data: &Path, config: &str, args: &[OsString]) -> Serve {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::fs::create_dir_all(data).unwrap();
        let config_file = data.join("niix.toml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(data.join("serve.log")).unwrap();
        let ort = std::env::var_os("ORT_DYLIB_PATH")
            .unwrap_or_else(|| workspace().join(".niix/onnxruntime").join(niix_inference::runtime::ORT_LIBRARY).into());
        let mut child = Command::new(niix_bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                "127.0.0.1:0",
                "--web-listen",
                "127.0.0.1:0",
            ])
            .arg("--config")
            .arg(&config_file)
            .arg("--data")
            .arg(data)
            .args(args)
            .env("NIIX_LOG", "warn")
            .env("ORT_DYLIB_PATH", ort)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (build it: make release)", niix_bin().display()));
        for _ in 0..400 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Serve { child, url: format!("http://127.0.0.1:{port}") };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("niix serve exited ({status}); see {}", data.join("serve.log").display());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("niix serve did not come up; see {}", data.join("serve.log").display());
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child has exited (it should not have).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// CPU seconds (user + system) the child has used so far, and its minor
    /// page faults.
    pub fn cpu(&self) -> ProcessCpu {
        ProcessCpu::of(&self.child.id().to_string())
    }

    /// A memory figure of `/proc/PID/status` in MiB, e.g. `VmRSS` (resident
    /// now) or `VmHWM` (peak resident); 0 when unreadable.
    pub fn memory_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PackBits of `n` copies of `value`: runs of 128 (two bytes each).
fn packbits_constant(n: usize, value: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(n / 64 + 2);
    let mut left = n;
    while left > 0 {
        let run = left.min(128);
        out.extend([(1 - run as i32) as u8, value]);
        left -= run;
    }
    out
}

/// A decompression bomb: a DICOS DX object (RLE Lossless, high energy) of
/// `side x side` 16-bit samples all equal to `sample`, a few MB that decode
/// to `2 x side²` bytes.
pub fn dicos_rle_bomb(side: u16, sample: u16) -> Vec<u8> {
    use dicom_core::value::{PixelFragmentSequence, Value};
    use dicom_core::{DataElement, VR, dicom_value};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    const DX_PROCESSING: &str = "1.2.840.10008.5.1.4.1.1.501.2.2";

    let pixels = usize::from(side) * usize::from(side);
    let high = packbits_constant(pixels, (sample >> 8) as u8);
    let low = packbits_constant(pixels, sample as u8);
    let mut fragment = vec![0u8; 64];
    fragment[..4].copy_from_slice(&2u32.to_le_bytes());
    fragment[4..8].copy_from_slice(&64u32.to_le_bytes());
    fragment[8..12].copy_from_slice(&(64 + high.len() as u32).to_le_bytes());
    fragment.extend(high);
    fragment.extend(low);
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, DX_PROCESSING));
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4"));
    obj.put(DataElement::new(tags::MODALITY, VR::CS, "DX"));
    obj.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, dicom_value!(Strs, ["ORIGINAL", "PRIMARY", "HIGH ENERGY"])));
    obj.put(DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, [side])));
    obj.put(DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, [side])));
    obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, dicom_value!(U16, [1])));
    obj.put(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, dicom_value!(U16, [16])));
    obj.put(DataElement::new(tags::BITS_STORED, VR::US, dicom_value!(U16, [16])));
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, dicom_value!(U16, [15])));
    obj.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, dicom_value!(U16, [0])));
    let sequence = PixelFragmentSequence::new(Vec::<u32>::new(), vec![fragment]);
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(sequence)));
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.5")
                .media_storage_sop_class_uid(DX_PROCESSING)
                .media_storage_sop_instance_uid("1.2.3.4"),
        )
        .expect("a complete file meta group");
    let mut out = Vec::new();
    file.write_all(&mut out).expect("writing to memory");
    out
}

/// A decompression bomb: a 16-bit grey PNG of `side x side` samples all
/// equal to `sample` (a few MB).
pub fn png_bomb(side: u32, sample: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, side, side);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Sixteen);
    enc.set_compression(png::Compression::Fast);
    let mut header = enc.write_header().expect("writing to memory");
    let mut writer = header.stream_writer().expect("writing to memory");
    let row: Vec<u8> = std::iter::repeat_n(sample.to_be_bytes(), side as usize).flatten().collect();
    for _ in 0..side {
        std::io::Write::write_all(&mut writer, &row).expect("writing to memory");
    }
    writer.finish().expect("writing to memory");
    header.finish().expect("writing to memory");
    out
}

/// CPU use of a process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCpu {
    /// User + system CPU seconds.
    pub seconds: f64,
    /// Minor page faults (each a page the kernel had to map, often zero-filled).
    pub minor_faults: u64,
}

impl ProcessCpu {
    /// Of process `pid` (`"self"` for this one); zeros when unreadable.
    pub fn of(pid: &str) -> ProcessCpu {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at the state, field 3.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // Clock ticks are 1/100 s on Linux.
        ProcessCpu { seconds: (field(14) + field(15)) as f64 / 100.0, minor_faults: field(10) }
    }

    /// What was used between `before` and `self`.
    pub fn since(self, before: ProcessCpu) -> ProcessCpu {
        ProcessCpu { seconds: self.seconds - before.seconds, minor_faults: self.minor_faults - before.minor_faults }
    }
}
