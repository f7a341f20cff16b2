#!/usr/bin/env python3
"""A tritonclient load loop against niix's Open Inference Protocol: CLIENTS
threads each send ModelInfer with one dual-energy scan (UINT16 planes) for
SECONDS, after one warm-up call each. Prints `name: value` lines:
inferences per second and latency percentiles in milliseconds.

Usage: oip_load.py HOST:PORT MODEL WIDTH HEIGHT CLIENTS SECONDS
"""

import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient


def planes(w, h):
    rng = np.random.default_rng(7)
    high = (30000 + rng.integers(0, 97, size=(h, w))).astype(np.uint16)
    high[h // 2:h // 2 + 44, w // 3:w // 3 + 56] = 3000
    return high, (high.astype(np.uint32) * 3 // 5).astype(np.uint16)


def main() -> None:
    target, model = sys.argv[1], sys.argv[2]
    w, h, clients, seconds = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    high, low = planes(w, h)
    latencies, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(clients + 1)

    def run():
        client = grpcclient.InferenceServerClient(url=target)
        inputs = []
        for name, array in (("high_energy", high), ("low_energy", low)):
            t = grpcclient.InferInput(name, [h, w], "UINT16")
            t.set_data_from_numpy(array)
            inputs.append(t)
        wanted = [grpcclient.InferRequestedOutput(n) for n in ("score", "alarm", "regions")]
        client.infer(model, inputs, outputs=wanted)  # warm-up
        start.wait()
        end = time.monotonic() + seconds
        mine = []
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                client.infer(model, inputs, outputs=wanted)
                mine.append(time.monotonic() - t0)
            except Exception as e:  # counted, printed once
                with lock:
                    errors.append(str(e))
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    lat = np.sort(np.array(latencies)) * 1000.0
    print(f"oip_scan: {w}x{h} dual-energy UINT16, {clients} clients, {seconds:.0f} s")
    print(f"oip_inferences: {len(lat)}")
    print(f"oip_errors: {len(errors)}")
    if errors:
        print(f"oip_first_error: {errors[0]}")
    print(f"oip_inferences_per_s: {len(lat) / wall:.2f}")
    if len(lat):
        for q in (50, 90, 99):
            print(f"oip_p{q}_ms: {np.percentile(lat, q):.1f}")
        print(f"oip_max_ms: {lat[-1]:.1f}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
