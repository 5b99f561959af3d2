"""A full-size SD 1.5 single file served offline through the bundled configs and tokenizers.

The suite's slowest test (about a minute on 2 cores; memory peak about 6 GB): it writes SD 1.5's
full architecture with random weights in the original CompVis layout (fp16, 2.1 GB), starts
the server with the Hub switched off (HF_HUB_OFFLINE=1, every non-loopback connection refused)
and generates one small image over HTTP.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest

from tests.conftest import body, png
from tests.original_layout import write_random_checkpoint

pytestmark = pytest.mark.bigfile


def test_full_size_sd15_single_file_serves_offline(make_server, network_off: list,
                                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sd15-random.safetensors"
    size = write_random_checkpoint("sd15", path)
    gc.collect()
    assert size > 2_000_000_000  # 1.07 billion fp16 parameters
    with caplog.at_level(logging.INFO):
        server = make_server(f"models:\n  sd15-file:\n    source: {path}\n    preload: true\n",
                             allow_downloads=False, max_batch=1)
    with server.client(timeout=600) as c:
        assert c.get("/sd/models-sd").json() == ["sd15-file"]
        answer = c.post("/sd", json=body(model="sd15-file", steps=2, width=64, height=64))
        assert png(answer).size == (64, 64)
    server.stop()
    assert network_off == []
    noise = [r.getMessage() for r in caplog.records
             if "offline" in r.getMessage().lower() or "retry" in r.getMessage().lower()]
    assert noise == []
