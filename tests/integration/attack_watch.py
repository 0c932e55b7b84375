"""A well-behaved CRI client for tests/integration/test_proxy_attacks.py, run as its own process (so
the attacker's Python in the test process never delays it): ImageStatus and ListImages through the
proxy in a loop until ``stop_file`` exists, checking every answer; samples the daemon's RSS. Prints
one JSON line: calls, errors, slowest call, peak RSS.

    python -m tests.integration.attack_watch ENDPOINT IMAGE IMAGE_ID LIST_COUNT PID STOP_FILE
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import grpc
import psutil

from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.cri.gen import cri_api_pb2_grpc as pb_grpc


def main(argv: list[str]) -> int:
    endpoint, image, image_id, list_count, pid, stop_file = argv
    want_list = int(list_count)
    proc = psutil.Process(int(pid))
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    opts = [("grpc.max_receive_message_length", 64 << 20)]
    calls, errors, slowest = 0, [], 0.0
    with grpc.insecure_channel(endpoint, options=opts) as ch:
        stub = pb_grpc.ImageServiceStub(ch)
        i = 0
        while not os.path.exists(stop_file) or calls < 4:
            i += 1
            t0 = time.monotonic()
            try:
                if i % 2:
                    r = stub.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image)), timeout=5)
                    if r.image.id != image_id:
                        errors.append(f"ImageStatus answered {r.image.id!r}")
                else:
                    lr = stub.ListImages(pb.ListImagesRequest(), timeout=5)
                    if len(lr.images) != want_list:
                        errors.append(f"ListImages answered {len(lr.images)} images")
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
            took = time.monotonic() - t0
            slowest = max(slowest, took)
            calls += 1
            if calls == 1:
                print("calling", flush=True)  # connected: the attack may start
            time.sleep(0.01)
    done.set()
    sampler.join(1)
    print(json.dumps({"calls": calls, "errors": errors[:10], "slowest": slowest, "peak_rss": peak[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
