//! Power loss, not just a killed process: the data directory lives on an
//! ext4 file system in a loop-mounted image, and a "power cut" is a copy of
//! the image taken right after SIGKILL. The copy holds only what the file
//! system had sent to its block device: what niix fsynced (and what the
//! journal committed for it), not the page cache a SIGKILL leaves behind.
//! The file system is mounted with a one-hour journal commit interval, so
//! within these few seconds nothing reaches the device unless niix syncs it.
//! A server started on the copy must list every acknowledged scan, whole,
//! and nothing partial. Skips (saying why) where loop mounts are not
//! permitted.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{ListScansRequest, PlaneEncoding, Scan};

/// An ext4 image mounted through a loop device; unmounted and detached on drop.
struct Disk {
    dev: String,
    mnt: PathBuf,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(format!("{cmd}: {e}")),
    }
}

impl Disk {
    /// Mounts `image` at `mnt`.
    fn mount(image: &Path, mnt: &Path) -> Result<Disk, String> {
        std::fs::create_dir_all(mnt).unwrap();
        let dev = run("losetup", &["--find", "--show", image.to_str().unwrap()])?;
        if let Err(e) = run("mount", &["-o", "commit=3600", &dev, mnt.to_str().unwrap()]) {
            let _ = run("losetup", &["-d", &dev]);
            return Err(e);
        }
        Ok(Disk { dev, mnt: mnt.to_path_buf() })
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mnt.to_str().unwrap()]);
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

/// A fresh 256 MiB ext4 image, or why there cannot be one here.
fn new_image(path: &Path) -> Result<(), String> {
    std::fs::File::create(path).unwrap().set_len(256 << 20).unwrap();
    run("mkfs.ext4", &["-q", "-F", path.to_str().unwrap()]).map(drop)
}

/// `niix serve` over `data` on the small disk (its free-space floor lowered
/// to 16 MiB from the default 1 GiB).
async fn serve(data: &Path) -> Server {
    let config = data.parent().unwrap().join("niix.toml");
    std::fs::write(&config, "[storage]\nmin_free_bytes = 16777216\n").unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["--config".into(), config.into(), "--data".into(), data.into()];
    args.extend(["--models".into(), fixtures().join("models").into(), "--model".into(), "demo-local-contrast".into()]);
    Server::spawn_args(free_port(), &args).await
}

async fn all_scans(ch: &tonic::transport::Channel) -> Vec<Scan> {
    let mut findings = FindingsClient::new(ch.clone());
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let req = ListScansRequest { page_size: 500, page_token: token, ..Default::default() };
        let page = findings.list_scans(req).await.unwrap().into_inner();
        out.extend(page.scans);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// Every acknowledged scan is listed and its blob re-hashes to the digest
/// sent; every listed scan was sent, whole.
async fn check_store(data: &Path, acked: &HashMap<String, String>, sent: &HashMap<String, String>, round: usize) {
    let server = serve(data).await;
    let ch = niix::client::connect(&server.url).await.unwrap();
    let visible: HashMap<String, Scan> = all_scans(&ch).await.into_iter().map(|s| (s.scan_id.clone(), s)).collect();
    for (id, sha) in acked {
        let scan = visible.get(id).unwrap_or_else(|| panic!("after power cut {round}: acknowledged scan {id} is lost"));
        assert_eq!(&scan.planes[0].sha256, sha, "after power cut {round}: {id}");
    }
    for (id, scan) in &visible {
        let sha = sent.get(id).unwrap_or_else(|| panic!("after power cut {round}: {id} was never sent"));
        assert_eq!(&scan.planes[0].sha256, sha, "after power cut {round}: {id} is visible with other bytes");
        let blob = data.join("blobs").join(&sha[..2]).join(sha);
        let bytes = std::fs::read(&blob).unwrap_or_else(|e| panic!("after power cut {round}: blob of {id}: {e}"));
        assert_eq!(&sha256(&bytes), sha, "after power cut {round}: {id}'s blob lost bytes");
    }
    println!("power cut {round}: {} acknowledged, {} visible, all whole", acked.len(), visible.len());
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_cut_keeps_every_acknowledged_scan_and_shows_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let mut image = dir.path().join("disk-0.img");
    if let Err(why) = new_image(&image) {
        eprintln!("SKIPPED: cannot make an ext4 image here ({why})");
        return;
    }
    let sent: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut rng = niix_synth::rng::Rng::new(0x706f_7765, 0);
    for round in 0..3u32 {
        let disk = match Disk::mount(&image, &dir.path().join(format!("mnt-{round}"))) {
            Ok(d) => d,
            Err(why) => {
                assert_eq!(round, 0, "the image mounted before: {why}");
                eprintln!("SKIPPED: cannot loop-mount an image here ({why})");
                return;
            }
        };
        let data = disk.mnt.join("data");
        if round > 0 {
            let sent_so_far = sent.lock().unwrap().clone();
            check_store(&data, &acked, &sent_so_far, round as usize - 1).await;
        }
        let server = serve(&data).await;
        let ch = niix::client::connect(&server.url).await.unwrap();
        let acked_now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let pushers: Vec<_> = (0..3u32)
            .map(|p| {
                let (ch, sent, acked_now) = (ch.clone(), sent.clone(), acked_now.clone());
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    for k in 0u32.. {
                        let raw = raw_bytes(1024, 1024, (round << 20) ^ (p << 16) ^ k);
                        let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 1024, 1024, &raw));
                        sent.lock().unwrap().insert(h.scan_id.clone(), sha256(&raw));
                        match push_messages(&ch, messages(&h, &[&raw], 256 << 10)).await {
                            Ok(receipt) => {
                                done.push((receipt.scan_id, receipt.planes[0].sha256.clone()));
                                acked_now.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(_) => return done,
                        }
                    }
                    done
                })
            })
            .collect();
        // Cut at a random moment, but only once this round has at least one
        // acknowledged scan to lose (a slow machine may need longer for it).
        tokio::time::sleep(Duration::from_millis(400 + rng.next_u64() % 1200)).await;
        let waiting = std::time::Instant::now();
        while acked_now.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(waiting.elapsed() < Duration::from_secs(300), "round {round}: no push acknowledged in 5 min");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The power cut: the process dies, and only what reached the device survives.
        server.kill9();
        let next = dir.path().join(format!("disk-{}.img", round + 1));
        std::fs::copy(&image, &next).unwrap();
        for p in pushers {
            acked.extend(p.await.unwrap());
        }
        drop(disk);
        std::fs::remove_file(&image).unwrap();
        image = next;
    }
    let disk = Disk::mount(&image, &dir.path().join("mnt-last")).unwrap();
    let sent = sent.lock().unwrap().clone();
    check_store(&disk.mnt.join("data"), &acked, &sent, 2).await;
    assert!(acked.len() >= 3, "too few scans acknowledged to test anything: {}", acked.len());
}
