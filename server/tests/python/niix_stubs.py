"""Python gRPC stubs of niix.v1, generated from proto/ with grpcio-tools, as
an outside client author would make them (see docs/protocol.md).

    import niix_stubs
    pb, rpc = niix_stubs.load()   # pb.ingest_pb2, rpc.findings_pb2_grpc, ...
"""

import importlib
import os
import sys
import tempfile
from types import SimpleNamespace

import grpc_tools
from grpc_tools import protoc

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
NAMES = ["scan", "report", "ingest", "findings", "exchange"]


def load(out_dir=None):
    """Generates the stubs into `out_dir` (a fresh temporary directory by
    default) and imports them. Returns (messages, services) namespaces."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="niix-stubs-")
    proto_dir = os.path.join(REPO, "proto")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = [f"niix/v1/{n}.proto" for n in NAMES]
    rc = protoc.main(
        ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    )
    if rc != 0:
        raise SystemExit(f"grpc_tools.protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    pb = SimpleNamespace(**{n: importlib.import_module(f"niix.v1.{n}_pb2") for n in NAMES})
    rpc = SimpleNamespace(**{n: importlib.import_module(f"niix.v1.{n}_pb2_grpc") for n in NAMES})
    return pb, rpc
