#!/usr/bin/env python3
"""A bounded attack run against the real release `niix serve` (make attack).

Starts target/release/niix on loopback with tokens for every role, a small
data directory (a 64 MiB tmpfs when run as root, else a temporary directory
with `storage.min_free_bytes` set just under its free space) and a signing
key, then runs the attack kinds of issue #25 concurrently for --duration
seconds from outside, through Python grpcio stubs generated from proto/:

  junk-paths   unauthenticated calls to made-up and label-injecting paths
  silent-conns bursts of 1100 TCP connections that never send a byte (the
               server runs with 1024 file handles)
  idle-pushes  PushScan streams that send their header, then nothing
  disk-fill    a scanner pushing scans until the free-space floor refuses
  wrong-site   a site-scoped scanner pushing for another site
  bombs        headers declaring planes past the limits
  roles        every role calling RPCs its role may not call
  receive      a partner that is not an issuer streaming a huge Receive
  officer-id   adjudications with someone else's officer_id
  mix-resume   a resumed upload whose header drops the declared digest

Every 200 ms it samples the server: /metrics parsed with prometheus_client,
VmRSS/VmHWM from /proc, and a health check on a fresh connection. At the
end it checks the store (every listed scan was acknowledged; none that was
refused is listed; reports name the authenticated officer) and what the
partner is shared (only its agreement's site; no package to a partner
without an agreement), verifies the audit log, and prints PASS/FAIL per
criterion. Exit status 1 when any criterion fails.

    .niix/venv/bin/python benches/attack/attack.py --duration 60
"""

import argparse
import multiprocessing
import hashlib
import http.client
import os
import random
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "server", "tests", "python"))

import grpc  # noqa: E402
import niix_stubs  # noqa: E402
from prometheus_client.openmetrics.parser import text_string_to_metric_families  # noqa: E402

pb, rpc = niix_stubs.load()

RSS_LIMIT_MIB = 1024
HEALTH_LIMIT_S = 1.0
SAMPLE_EVERY_S = 0.2
PLANE_W, PLANE_H = 256, 256
# File handles of the server process (a common default), and silent
# connections opened at once: more than the server has handles.
SERVER_NOFILE = 1024
SILENT_BURST = 1100


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_entry(identity, role, sites=()):
    token = "atk_" + secrets.token_hex(16)
    digest = hashlib.sha256(token.encode()).hexdigest()
    toml = f'[[auth.tokens]]\nidentity = "{identity}"\nrole = "{role}"\nsha256 = "{digest}"\n'
    if sites:
        toml += "sites = [" + ", ".join(f'"{s}"' for s in sites) + "]\n"
    return token, toml + "\n"


class Result:
    """What the attackers saw, shared by the threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = set()  # scan ids the server acknowledged
        self.refused = set()  # scan ids whose push was refused (never acknowledged)
        self.counts = {}  # (attack, outcome) -> n
        self.unexpected = []  # outcomes that break the rules

    def count(self, attack, outcome):
        with self.lock:
            self.counts[(attack, outcome)] = self.counts.get((attack, outcome), 0) + 1

    def bad(self, what):
        with self.lock:
            if len(self.unexpected) < 50:
                self.unexpected.append(what)


class Run:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="niix-attack-")
        self.data = os.path.join(self.work, "data")
        os.makedirs(self.data)
        self.tmpfs = False
        if os.geteuid() == 0 and not args.no_tmpfs:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mib}m", "tmpfs", self.data],
                               capture_output=True, text=True)
            self.tmpfs = r.returncode == 0
            if not self.tmpfs:
                print(f"attack: no tmpfs ({r.stderr.strip()}); using {self.data}", file=sys.stderr)
        free = shutil.disk_usage(self.data).free
        # Leave about 24 MiB for scans above the floor.
        self.min_free = max(free - (24 << 20), 1 << 20)
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.stop = threading.Event()
        self.result = Result()
        self.samples = []  # (t, metrics_ok, rss_mib, hwm_mib, health_s or None, error)
        self.health_errors = []

    # ---- setup -----------------------------------------------------------
    def configure(self):
        niix = self.args.niix
        keys = os.path.join(self.work, "keys")
        subprocess.run([niix, "keys", "init", "--dir", keys], check=True, capture_output=True)
        other = os.path.join(self.work, "be-keys")
        subprocess.run([niix, "keys", "init", "--dir", other], check=True, capture_output=True)
        be_public = open(os.path.join(other, "niix-ed25519.pub")).read().strip()
        self.tokens = {}
        toml = ""
        for name, role, sites in [
            ("scanner-nl", "scanner", ["NLRTM"]),
            ("scanner-de", "scanner", ["DEHAM"]),
            ("officer-nl", "officer", ["NLRTM"]),
            ("officer-all", "officer", []),
            ("admin", "admin", []),
            ("DE", "partner", []),
            ("XX", "partner", []),
        ]:
            token, entry = token_entry(name, role, sites)
            self.tokens[name] = token
            toml += entry
        config = f"""listen = "{self.target}"
metrics_listen = "127.0.0.1:{self.metrics_port}"
data_dir = "{self.data}"
models_dir = "{os.path.join(REPO, 'fixtures', 'models')}"

[limits]
{f"max_connections = {self.args.max_connections}" if self.args.max_connections else ""}
handshake_timeout = "5s"
upload_stall_timeout = "3s"
max_uploads_per_identity = 4

[storage]
min_free_bytes = {self.min_free}

[analysis]
model = "demo-local-contrast"

{toml}
[exchange]
administration = "NL"
signing_key = "{os.path.join(keys, 'niix-ed25519.key')}"
max_receive_message_bytes = 4194304

[[exchange.agreements]]
name = "NL-DE-ATTACK"
partner = "DE"
sites = ["NLRTM"]
content = "findings"

[[exchange.issuers]]
administration = "BE"
public_key = "{be_public}"
"""
        self.config = os.path.join(self.work, "niix.toml")
        with open(self.config, "w") as f:
            f.write(config)

    def start(self):
        env = dict(os.environ)
        env.setdefault("ORT_DYLIB_PATH", os.path.join(REPO, ".niix", "onnxruntime", "libonnxruntime.so.1.31.1"))
        self.log = open(os.path.join(self.work, "serve.log"), "w")
        def limit_handles():
            resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE, SERVER_NOFILE))

        self.proc = subprocess.Popen([self.args.niix, "serve", "--config", self.config],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     preexec_fn=limit_handles)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"niix serve exited at start; see {self.log.name}:\n" + open(self.log.name).read())
            if self.health(timeout=1.0) is not None:
                self.health_errors.clear()  # refusals while it was starting
                return
            time.sleep(0.2)
        raise SystemExit("niix serve did not answer health within 30 s")

    def md(self, who):
        return (("authorization", f"Bearer {self.tokens[who]}"),)

    # ---- observation -----------------------------------------------------
    def health(self, timeout=HEALTH_LIMIT_S):
        """Seconds a health check on a fresh connection took, or None (the
        error is kept in self.health_errors)."""
        t = time.monotonic()
        ch = grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            call = ch.unary_unary("/grpc.health.v1.Health/Check",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
            call(b"", timeout=timeout)
            return time.monotonic() - t
        except grpc.RpcError as e:
            self.health_errors.append(f"{e.code().name}: {e.details()}"[:200])
            return None
        finally:
            ch.close()

    def metrics(self):
        c = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=2)
        try:
            c.request("GET", "/metrics")
            r = c.getresponse()
            body = r.read().decode()
            if r.status != 200:
                return f"HTTP {r.status}"
            families = list(text_string_to_metric_families(body))
            if not families:
                return "empty page"
            return None
        except Exception as e:  # a page prometheus_client cannot parse, or no page
            return f"{type(e).__name__}: {e}"[:300]
        finally:
            c.close()

    def memory(self):
        rss = hwm = 0.0
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        return rss, hwm

    def sampler(self):
        start = time.monotonic()
        while not self.stop.is_set():
            t0 = time.monotonic()
            err = self.metrics()
            rss, hwm = self.memory()
            h = self.health()
            self.samples.append((t0 - start, err is None, rss, hwm, h, err))
            time.sleep(max(0.0, SAMPLE_EVERY_S - (time.monotonic() - t0)))

    # ---- helpers ---------------------------------------------------------
    def header(self, scan_id, site, raw, digest=True, width=PLANE_W, height=PLANE_H, byte_length=None):
        plane = pb.scan.PlaneDescriptor(
            kind=pb.scan.PLANE_KIND_HIGH_ENERGY, width=width, height=height, bits_stored=16,
            pixel_spacing_x_mm=4.0, pixel_spacing_y_mm=4.0, intensity=1,
            encoding=pb.scan.PLANE_ENCODING_RAW_U16LE,
            byte_length=len(raw) if byte_length is None else byte_length,
            sha256=hashlib.sha256(raw).hexdigest() if digest else "")
        meta = pb.scan.ScanMetadata(site_id=site, lane_id="L1", container_numbers=["CSQU3054383"],
                                    vehicle_plate="NL-AT-01", remarks="operator Jansen")
        return pb.ingest.ScanHeader(scan_id=scan_id, metadata=meta, planes=[plane])

    def push(self, who, header, chunks, timeout=20):
        stub = rpc.ingest.ScanIngestStub(self.channels[who])

        def messages():
            yield pb.ingest.PushScanRequest(header=header)
            for off, data in chunks:
                yield pb.ingest.PushScanRequest(chunk=pb.ingest.PlaneChunk(plane_index=0, offset=off, data=data))

        return stub.PushScan(messages(), metadata=self.md(who), timeout=timeout)

    def push_scan(self, attack, who, site, expect_ok):
        sid = str(uuid.uuid4())
        raw = os.urandom(PLANE_W * PLANE_H * 2)
        try:
            self.push(who, self.header(sid, site, raw), [(0, raw)])
            with self.result.lock:
                self.result.acked.add(sid)
            self.result.count(attack, "OK")
            if not expect_ok:
                self.result.bad(f"{attack}: push of {sid} for {site} by {who} was accepted")
        except grpc.RpcError as e:
            with self.result.lock:
                self.result.refused.add(sid)
            self.result.count(attack, e.code().name)
        return sid

    # ---- attacks ---------------------------------------------------------
    def junk_paths(self):
        ch = grpc.insecure_channel(self.target)
        rng = random.Random(1)
        n = 0
        while not self.stop.is_set():
            if n % 3 == 0:
                path = '/x/inj"}{'
            elif n % 3 == 1:
                path = "/" + "".join(rng.choice("abcdefghij/\"{}=,") for _ in range(rng.randint(10, 12000)))
            else:
                path = "/niix.v1.Findings/" + secrets.token_hex(rng.randint(1, 2000))
            call = ch.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call(b"x", timeout=2)
                self.result.bad(f"junk path {path[:40]!r} answered OK")
            except grpc.RpcError as e:
                self.result.count("junk-paths", e.code().name)
            n += 1
        ch.close()

    def silent_conns(self):
        # Its own process, as an attacker is: in this one, the bursts would
        # hold the interpreter lock between the sampler's connect and its
        # request, and measure the client instead of the server.
        stop = multiprocessing.Event()
        bursts = multiprocessing.Value("i", 0)
        failed = multiprocessing.Value("i", 0)
        flood = multiprocessing.Process(target=silent_bursts, args=(self.port, stop, bursts, failed), daemon=True)
        flood.start()
        self.stop.wait()
        stop.set()
        flood.join(timeout=30)
        for _ in range(bursts.value):
            self.result.count("silent-conns", "burst")
        for _ in range(failed.value):
            self.result.count("silent-conns", "connect failed")

    def idle_pushes(self):
        stub = rpc.ingest.ScanIngestStub(self.channels["scanner-nl"])
        while not self.stop.is_set():
            calls = []
            for _ in range(8):
                sid = str(uuid.uuid4())
                raw = os.urandom(PLANE_W * PLANE_H * 2)
                gate = threading.Event()
                header = self.header(sid, "NLRTM", raw)

                def messages(header=header, gate=gate):
                    yield pb.ingest.PushScanRequest(header=header)
                    gate.wait(30)

                with self.result.lock:
                    self.result.refused.add(sid)  # never completed
                calls.append((stub.PushScan.future(messages(), metadata=self.md("scanner-nl"), timeout=30), gate))
            for fut, gate in calls:
                try:
                    fut.result(timeout=35)
                    self.result.bad("an idle push completed")
                except grpc.RpcError as e:
                    self.result.count("idle-pushes", e.code().name)
                except grpc.FutureTimeoutError:
                    self.result.bad("an idle push was never cut")
                gate.set()
            self.stop.wait(0.5)

    def disk_fill(self):
        while not self.stop.is_set():
            self.push_scan("disk-fill", "scanner-nl", "NLRTM", expect_ok=True)

    def wrong_site(self):
        while not self.stop.is_set():
            self.push_scan("wrong-site", "scanner-nl", "DEHAM", expect_ok=False)
            self.stop.wait(0.2)

    def bombs(self):
        while not self.stop.is_set():
            sid = str(uuid.uuid4())
            raw = os.urandom(1024)
            h = self.header(sid, "NLRTM", raw, digest=False, width=65535, height=65535)
            try:
                self.push("admin", h, [(0, raw)], timeout=10)
                self.result.bad(f"bomb header {sid} accepted")
                with self.result.lock:
                    self.result.acked.add(sid)
            except grpc.RpcError as e:
                with self.result.lock:
                    self.result.refused.add(sid)
                self.result.count("bombs", e.code().name)
            self.stop.wait(0.2)

    def roles(self):
        calls = [
            ("scanner-nl", lambda ch, md: rpc.findings.FindingsStub(ch).ListScans(
                pb.findings.ListScansRequest(page_size=10), metadata=md, timeout=5)),
            ("DE", lambda ch, md: rpc.findings.FindingsStub(ch).ListScans(
                pb.findings.ListScansRequest(page_size=10), metadata=md, timeout=5)),
            ("officer-nl", lambda ch, md: rpc.ingest.ScanIngestStub(ch).AbortUpload(
                pb.ingest.AbortUploadRequest(scan_id=str(uuid.uuid4())), metadata=md, timeout=5)),
            ("admin", lambda ch, md: rpc.findings.FindingsStub(ch).Adjudicate(
                pb.findings.AdjudicateRequest(scan_id=str(uuid.uuid4())), metadata=md, timeout=5)),
            ("officer-all", lambda ch, md: rpc.exchange.ExchangeStub(ch).GetPackage(
                pb.exchange.GetPackageRequest(package_id="NL.DE.1"), metadata=md, timeout=5)),
            (None, lambda ch, md: rpc.findings.FindingsStub(ch).ListScans(
                pb.findings.ListScansRequest(page_size=10), metadata=(("authorization", "Bearer nope"),),
                timeout=5)),
        ]
        while not self.stop.is_set():
            for who, call in calls:
                md = self.md(who) if who else ()
                try:
                    call(self.channels["anon"], md)
                    self.result.bad(f"roles: {who} was allowed")
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                        self.result.bad(f"roles: {who} got {e.code().name}: {e.details()}")
                    self.result.count("roles", e.code().name)
            self.stop.wait(0.5)

    def receive(self):
        stub = rpc.exchange.ExchangeStub(self.channels["DE"])
        while not self.stop.is_set():
            pkg = pb.exchange.ResultPackage(content=os.urandom(3 << 20), signature=b"x" * 64,
                                            signer_public_key="00" * 32)

            def messages():
                yield pb.exchange.ReceiveRequest(package=pkg)

            try:
                stub.Receive(messages(), metadata=self.md("DE"), timeout=10)
                self.result.bad("receive: a non-issuer's package was accepted")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.PERMISSION_DENIED:
                    self.result.bad(f"receive: non-issuer got {e.code().name}: {e.details()}")
                self.result.count("receive", e.code().name)
            self.stop.wait(0.3)

    def officer_id(self):
        stub = rpc.findings.FindingsStub(self.channels["officer-nl"])
        while not self.stop.is_set():
            with self.result.lock:
                ids = list(self.result.acked)
            if ids:
                sid = random.choice(ids)
                req = pb.findings.AdjudicateRequest(scan_id=sid, officer_id="officer-all",
                                                    verdict=pb.report.VERDICT_DISMISSED)
                try:
                    stub.Adjudicate(req, metadata=self.md("officer-nl"), timeout=5)
                    self.result.count("officer-id", "OK")
                except grpc.RpcError as e:
                    self.result.count("officer-id", e.code().name)
            self.stop.wait(1.0)

    def mix_resume(self):
        while not self.stop.is_set():
            sid = str(uuid.uuid4())
            a = os.urandom(PLANE_W * PLANE_H * 2)
            b = os.urandom(len(a))
            half = len(a) // 2
            stub = rpc.ingest.ScanIngestStub(self.channels["scanner-nl"])

            def first():
                yield pb.ingest.PushScanRequest(header=self.header(sid, "NLRTM", a))
                yield pb.ingest.PushScanRequest(chunk=pb.ingest.PlaneChunk(plane_index=0, offset=0, data=a[:half]))

            try:
                # The stream ends after half the plane: the server keeps it staged.
                stub.PushScan(first(), metadata=self.md("scanner-nl"), timeout=10)
            except grpc.RpcError:
                pass
            try:
                self.push("scanner-nl", self.header(sid, "NLRTM", b, digest=False), [(half, b[half:])])
                with self.result.lock:
                    self.result.acked.add(sid)
                self.result.bad(f"mix-resume: {sid} stored half A, half B")
            except grpc.RpcError as e:
                with self.result.lock:
                    self.result.refused.add(sid)
                self.result.count("mix-resume", e.code().name)
            self.stop.wait(0.5)

    # ---- the end ---------------------------------------------------------
    def listed(self):
        stub = rpc.findings.FindingsStub(self.channels["admin"])
        ids, token = [], ""
        while True:
            page = stub.ListScans(pb.findings.ListScansRequest(page_size=500, page_token=token),
                                  metadata=self.md("admin"), timeout=30)
            ids += [s.scan_id for s in page.scans]
            if not page.next_page_token:
                return ids
            token = page.next_page_token

    def shared(self, who):
        """Packages `who` receives from its feed within a few seconds, or the refusal."""
        stub = rpc.exchange.ExchangeStub(self.channels[who])
        got = []
        try:
            for pkg in stub.Subscribe(pb.exchange.SubscribeRequest(cursor=0), metadata=self.md(who), timeout=4):
                content = pb.exchange.PackageContent()
                content.ParseFromString(pkg.content)
                got.append(content)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return got, e.code().name
        return got, None

    def run(self):
        self.configure()
        self.start()
        self.channels = {name: grpc.insecure_channel(self.target) for name in self.tokens}
        self.channels["anon"] = grpc.insecure_channel(self.target)
        attacks = [self.junk_paths, self.silent_conns, self.idle_pushes, self.disk_fill, self.wrong_site,
                   self.bombs, self.roles, self.receive, self.officer_id, self.mix_resume]
        threads = [threading.Thread(target=self.sampler, daemon=True)]
        threads += [threading.Thread(target=a, daemon=True, name=a.__name__) for a in attacks]
        print(f"attack: niix serve pid {self.proc.pid} on {self.target}, data {self.data} "
              f"({'tmpfs' if self.tmpfs else 'disk'}, min_free_bytes {self.min_free}), {self.args.duration} s",
              file=sys.stderr)
        for t in threads:
            t.start()
        self.stop.wait(self.args.duration)
        self.stop.set()
        for t in threads:
            t.join(timeout=60)
        return self.verdict()

    def verdict(self):
        checks = []
        alive = self.proc.poll() is None
        checks.append(("server alive at the end", alive, "" if alive else f"exit {self.proc.returncode}"))
        n = len(self.samples)
        bad_pages = [s for s in self.samples if not s[1]]
        checks.append(("/metrics parses (prometheus_client) in every sample", n > 0 and not bad_pages,
                       f"{n - len(bad_pages)}/{n} pages parsed" + (f"; first: {bad_pages[0][5]}" if bad_pages else "")))
        peak = max((s[3] for s in self.samples), default=0.0)
        checks.append((f"server VmHWM under {RSS_LIMIT_MIB} MiB", 0 < peak < RSS_LIMIT_MIB,
                       f"peak {peak:.0f} MiB, last RSS {self.samples[-1][2] if n else 0:.0f} MiB"))
        slow = [s for s in self.samples if s[4] is None or s[4] > HEALTH_LIMIT_S]
        worst = max((s[4] for s in self.samples if s[4] is not None), default=0.0)
        checks.append((f"health answers within {HEALTH_LIMIT_S:.0f} s on a fresh connection", n > 0 and not slow,
                       f"{n - len(slow)}/{n} in time, slowest answer {worst * 1000:.0f} ms" +
                       (f"; first failure: {self.health_errors[0]}" if self.health_errors else "")))
        if alive:
            listed = set(self.listed())
            leaked = listed & self.result.refused
            unknown = listed - self.result.acked
            checks.append(("nothing refused or unacknowledged is stored", not leaked and not unknown,
                           f"{len(listed)} listed, {len(self.result.acked)} acknowledged, "
                           f"{len(leaked)} refused but listed, {len(unknown)} listed but never acknowledged"))
            de, de_err = self.shared("DE")
            foreign = [p for p in de if p.metadata.site_id != "NLRTM" or p.recipient != "DE"]
            checks.append(("the partner gets only its agreement's scans", not foreign and de_err is None,
                           f"{len(de)} packages to DE, {len(foreign)} outside NLRTM" +
                           (f", feed failed {de_err}" if de_err else "")))
            xx, xx_err = self.shared("XX")
            checks.append(("a partner without an agreement gets nothing", not xx,
                           f"{len(xx)} packages, feed answered {xx_err or 'nothing'}"))
            fake = self.officer_records()
            checks.append(("reports name the authenticated officer", fake == 0, f"{fake} reports name another officer"))
        verify = subprocess.run([self.args.niix, "audit", "verify", "--data", self.data], capture_output=True,
                                text=True)
        checks.append(("audit log verifies", verify.returncode == 0, (verify.stdout + verify.stderr).strip()[:200]))
        checks.append(("no attack got an answer it must not", not self.result.unexpected,
                       "; ".join(self.result.unexpected[:5])))

        print("\nattack outcomes:")
        for (attack, outcome), k in sorted(self.result.counts.items()):
            print(f"  {attack:<13} {outcome:<20} {k}")
        print(f"\nsamples: {n} (every {SAMPLE_EVERY_S * 1000:.0f} ms)")
        print("\ncriteria:")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
        passed = all(ok for _, ok, _ in checks)
        print(f"\nattack: {'PASS' if passed else 'FAIL'}")
        return 0 if passed else 1

    def officer_records(self):
        stub = rpc.findings.FindingsStub(self.channels["officer-all"])
        fake = 0
        for sid in list(self.result.acked)[:200]:
            try:
                f = stub.GetFindings(pb.findings.GetFindingsRequest(scan_id=sid), metadata=self.md("officer-all"),
                                     timeout=5)
            except grpc.RpcError:
                continue
            for r in f.reports:
                if r.type == pb.report.REPORT_TYPE_OPERATOR and r.operator_id != "officer-nl":
                    fake += 1
        return fake

    def close(self):
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.tmpfs:
            subprocess.run(["umount", self.data], check=False)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"attack: kept {self.work}", file=sys.stderr)


def silent_bursts(port, stop, bursts, failed):
    """Opens SILENT_BURST connections that never send a byte, holds them 3 s,
    closes them, again until `stop`."""
    while not stop.is_set():
        socks = []
        for _ in range(SILENT_BURST):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except OSError:
                with failed.get_lock():
                    failed.value += 1
        with bursts.get_lock():
            bursts.value += 1
        stop.wait(3)
        for s in socks:
            s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60, help="seconds of attack (default 60)")
    ap.add_argument("--niix", default=os.path.join(REPO, "target", "release", "niix"), help="the niix binary")
    ap.add_argument("--tmpfs-mib", type=int, default=64, help="size of the tmpfs data directory")
    ap.add_argument("--no-tmpfs", action="store_true", help="use a temporary directory even as root")
    ap.add_argument("--max-connections", type=int, default=128,
                    help="limits.max_connections of the server (0: its default)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (config, data, serve.log)")
    args = ap.parse_args()
    run = Run(args)
    try:
        code = run.run()
    finally:
        run.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
