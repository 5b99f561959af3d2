"""Autoscaling on Ray Serve (issue 13): between RAY_MIN_REPLICAS=1 and RAY_MAX_REPLICAS=2 on
ongoing requests (RAY_TARGET_ONGOING=1). Under load from six clients a second replica comes
up; when the load drops to one client, the deployment scales back to one replica, and no
request of the whole run is dropped: scale-down drains a replica before it stops.

Serve's autoscaling metrics are pushed every 10 s by default; this local Ray pushes them
every second (RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S), so the test takes seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import API_KEY, body, write_models_file
from tests.live import free_port

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray", reason="Ray Serve is the `craftserve[ray]` extra")
pytest.importorskip("ray.serve")

MODELS = 'models:\n  tiny-sdxl: {source: "builtin:tiny-sdxl", preload: true}\n'


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from app.cluster.deploy import deploy, undeploy
    from app.config import Settings

    mp = pytest.MonkeyPatch()
    for name in ("REPLICA", "HANDLE"):
        mp.setenv(f"RAY_SERVE_{name}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    settings = Settings(
        models=write_models_file(tmp_path_factory.mktemp("autoscale"), MODELS),
        api_keys=[API_KEY], port=free_port(), max_queue=16, max_queue_per_key=16, max_batch=2,
        ray_min_replicas=1, ray_max_replicas=2, ray_target_ongoing=1, ray_gpus_per_replica=0,
        ray_cpus_per_replica=1, ray_upscale_delay_s=1, ray_downscale_delay_s=3,
    )
    ray.init(num_cpus=2, include_dashboard=False, namespace="craftserve",
             object_store_memory=256 * 2**20, logging_level=logging.WARNING)
    try:
        yield deploy(settings)
    finally:
        undeploy()
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        mp.undo()


def replicas(url: str) -> int:
    state = httpx.get(url + "/ready", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()
    return len(state["workers"]) if state["ready"] else 0


def wait_for(url: str, count: int, timeout: float) -> float:
    started = time.monotonic()
    while replicas(url) != count:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not {count} replica(s) within {timeout:g} s")
        time.sleep(0.25)
    return time.monotonic() - started


def test_scales_up_under_load_and_down_without_dropping_a_request(url: str) -> None:
    wait_for(url, 1, 60)
    codes: Counter[int] = Counter()
    workers: set[str] = set()
    active = [6]  # clients sending now: six, then one once the second replica is up
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                if index >= active[0]:
                    time.sleep(0.1)
                    continue
                answer = c.post("/sd", json=body(steps=20))
                codes[answer.status_code] += 1
                workers.add(answer.headers.get("x-worker", ""))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        up = wait_for(url, 2, 90)
        active[0] = 1  # the load drops to one client
        down = wait_for(url, 1, 90)
        time.sleep(2)  # the lone client goes on after the scale-down
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert set(codes) == {200}, codes
    assert len(workers) >= 2, workers  # the second replica served some of the load
    print(f"scaled up in {up:.1f} s, down in {down:.1f} s; {sum(codes.values())} requests, all 200")
