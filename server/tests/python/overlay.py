#!/usr/bin/env python3
"""RenderOverlay through a stock grpcio channel (default options: 4 MiB
receive limit). Prints what came back as JSON.

Usage: overlay.py HOST:PORT SCAN_ID OUT.png
"""

import json
import struct
import sys

import grpc

import niix_stubs


def main() -> None:
    target, scan_id, out = sys.argv[1:4]
    pb, rpc = niix_stubs.load()
    with grpc.insecure_channel(target) as channel:
        findings = rpc.findings.FindingsStub(channel)
        try:
            r = findings.RenderOverlay(pb.findings.RenderOverlayRequest(scan_id=scan_id), timeout=120)
        except grpc.RpcError as e:
            print(json.dumps({"ok": False, "code": e.code().name, "message": e.details()}))
            return
    with open(out, "wb") as f:
        f.write(r.png)
    # The PNG's own header: signature, then IHDR width and height.
    signature_ok = r.png[:8] == b"\x89PNG\r\n\x1a\n" and r.png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", r.png[16:24])
    print(json.dumps({
        "ok": True, "bytes": len(r.png), "message_bytes": r.ByteSize(), "width": r.width, "height": r.height,
        "png_width": width, "png_height": height, "signature_ok": signature_ok, "shrunk_to_fit": r.shrunk_to_fit,
    }))


if __name__ == "__main__":
    main()
