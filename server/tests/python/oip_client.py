#!/usr/bin/env python3
"""The Open Inference Protocol of niix as tritonclient (PyPI) sees it: list
the models, read a model's inputs and outputs, analyse a scan's planes with
ModelInfer. Prints the outcomes as one JSON line for the Rust test
(server/tests/interop_grpc.rs) to judge.

Usage: oip_client.py HOST:PORT MODEL WIDTH HEIGHT HIGH.raw LOW.raw
(the .raw files hold little-endian uint16 samples, row-major)
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def status_of(call):
    try:
        call()
        return {"code": "OK"}
    except InferenceServerException as e:
        return {"code": e.status(), "message": e.message()}


def main() -> None:
    target, model = sys.argv[1], sys.argv[2]
    w, h = int(sys.argv[3]), int(sys.argv[4])
    high = np.fromfile(sys.argv[5], dtype="<u2").reshape(h, w)
    low = np.fromfile(sys.argv[6], dtype="<u2").reshape(h, w)
    client = grpcclient.InferenceServerClient(url=target)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "index": client.get_model_repository_index(as_json=True),
        "model_ready": client.is_model_ready(model),
        "metadata": client.get_model_metadata(model, as_json=True),
    }

    def infer(planes, outputs=None, name=model):
        inputs = []
        for kind, array in planes:
            t = grpcclient.InferInput(kind, list(array.shape), "UINT16")
            t.set_data_from_numpy(array)
            inputs.append(t)
        wanted = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
        return client.infer(name, inputs, outputs=wanted)

    # [H, W] for one plane, [1, H, W] for the other: both shapes are accepted.
    result = infer([("high_energy", high), ("low_energy", low[np.newaxis, :, :])])
    amap = result.as_numpy("anomaly_map")
    out["infer"] = {
        "model_version": result.get_response().model_version,
        "score": float(result.as_numpy("score")[0]),
        "alarm": bool(result.as_numpy("alarm")[0]),
        "regions": result.as_numpy("regions").tolist(),
        "map_shape": list(amap.shape),
        "map_max": float(amap.max()),
        "stride": result.get_response().parameters["stride"].int64_param,
    }
    only = infer([("high_energy", high), ("low_energy", low)], outputs=["score"])
    out["only_score"] = [o.name for o in only.get_response().outputs]
    # Refusals a client can act on.
    out["missing_plane"] = status_of(lambda: infer([("high_energy", high)], name="dual-only"))
    out["float_plane"] = status_of(lambda: client.infer(model, [
        grpcclient.InferInput("high_energy", [h, w], "FP32").set_data_from_numpy(high.astype(np.float32))]))
    out["unknown_model"] = status_of(lambda: infer([("high_energy", high)], name="no-such-model"))
    out["unknown_output"] = status_of(lambda: infer([("high_energy", high)], outputs=["logits"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
