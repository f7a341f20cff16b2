#!/usr/bin/env python3
"""The validation and normalisation rules of docs/protocol.md, exercised
through grpcio stubs generated from proto/. Prints each outcome as JSON for
the Rust test (server/tests/interop.rs) to judge.

Usage: validation.py HOST:PORT ANALYSED_SCAN_ID REGION_ID
"""

import json
import sys
import time
import uuid

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

import niix_stubs


def outcome(call):
    try:
        return {"code": "OK", "value": call()}
    except grpc.RpcError as e:
        return {"code": e.code().name, "message": e.details()}


def main() -> None:
    target, scan_id, region = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pb, rpc = niix_stubs.load()
    f, r = pb.findings, pb.report
    out = {}
    with grpc.insecure_channel(target) as channel:
        findings = rpc.findings.FindingsStub(channel)
        ingest = rpc.ingest.ScanIngestStub(channel)

        def adjudicate(regions):
            req = f.AdjudicateRequest(scan_id=scan_id, verdict=r.VERDICT_CONFIRMED, officer_id="NL-7",
                                      regions=[f.RegionVerdict(region_id=region, verdict=v) for v in regions])
            return lambda: r.ReportType.Name(findings.Adjudicate(req).type)

        out["unspecified_region_verdict"] = outcome(adjudicate([r.VERDICT_UNSPECIFIED]))
        out["conflicting_region_verdicts"] = outcome(adjudicate([r.VERDICT_CONFIRMED, r.VERDICT_DISMISSED]))
        out["one_region_verdict"] = outcome(adjudicate([r.VERDICT_DISMISSED]))

        def listed(**kw):
            return lambda: [s.scan_id for s in findings.ListScans(f.ListScansRequest(**kw)).scans]

        out["lowercase_container"] = outcome(listed(container_number=" csqu3054383"))
        out["uppercase_container"] = outcome(listed(container_number="CSQU3054383"))
        out["bad_check_digit"] = outcome(listed(container_number="csqu3054384"))
        first = findings.ListScans(f.ListScansRequest(page_size=1))
        token = first.next_page_token
        out["token_same_filters"] = outcome(listed(page_size=1, page_token=token))
        out["token_other_filters"] = outcome(listed(page_size=1, page_token=token, site_id="BEANR-02"))
        out["uppercase_get"] = outcome(lambda: findings.GetScan(f.GetScanRequest(scan_id=scan_id.upper())).scan.scan_id)

        # A push with an upper-case id, a lower-case container number and no scan_time.
        raw = (30000 + (np.arange(64 * 32, dtype=np.uint64) * 7919) % 97).astype("<u2").tobytes()
        pushed = str(uuid.uuid4()).upper()
        header = pb.ingest.ScanHeader(
            scan_id=pushed,
            metadata=pb.scan.ScanMetadata(site_id=" NLRTM-01 ", container_numbers=["msku9070323"]),
            planes=[pb.scan.PlaneDescriptor(
                kind=pb.scan.PLANE_KIND_HIGH_ENERGY, width=64, height=32, bits_stored=16,
                intensity=pb.scan.INTENSITY_RELATIONSHIP_LINEAR, encoding=pb.scan.PLANE_ENCODING_RAW_U16LE,
                byte_length=len(raw))],
        )
        before = Timestamp()
        before.FromSeconds(int(time.time()) - 60)
        messages = [pb.ingest.PushScanRequest(header=header),
                    pb.ingest.PushScanRequest(chunk=pb.ingest.PlaneChunk(plane_index=0, offset=0, data=raw))]
        receipt = ingest.PushScan(iter(messages))
        stored = findings.GetScan(f.GetScanRequest(scan_id=pushed)).scan
        out["pushed"] = {
            "sent_id": pushed, "receipt_id": receipt.scan_id, "stored_id": stored.scan_id,
            "site": stored.metadata.site_id, "containers": list(stored.metadata.container_numbers),
            "has_scan_time": stored.metadata.HasField("scan_time"),
        }
        out["found_by_received_time"] = outcome(listed(scan_time_from=before, container_number="MSKU9070323"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
