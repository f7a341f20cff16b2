#!/usr/bin/env python3
"""Walks every page of ListScans (page_size 1000) through a stock grpcio
channel (4 MiB receive limit) and prints the page sizes and scan ids as JSON.

Usage: pages.py HOST:PORT
"""

import json
import sys

import grpc

import niix_stubs


def main() -> None:
    pb, rpc = niix_stubs.load()
    sizes, ids, token = [], [], ""
    with grpc.insecure_channel(sys.argv[1]) as channel:
        findings = rpc.findings.FindingsStub(channel)
        while True:
            page = findings.ListScans(pb.findings.ListScansRequest(page_size=1000, page_token=token))
            sizes.append(len(page.scans))
            ids += [s.scan_id for s in page.scans]
            token = page.next_page_token
            if not token:
                break
    print(json.dumps({"pages": sizes, "ids": ids}))


if __name__ == "__main__":
    main()
