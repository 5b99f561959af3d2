"""A 60-second soak (scripts/soak.py --start): every dialect, LoRA sets, samplers, sizes,
interrupts, client disconnects, bad bodies, a key past its rate limit, against its own
`craftserve serve` subprocess. No 5xx, every request finished, the replayed job's bytes never
changed, the worker alive, the server's RSS bounded (loosely: 60 s is mostly warm-up; the
10-minute figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.soak, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parent.parent


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_60_seconds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "soak.json"
    status = load_soak().main(["--start", "--seconds", "60", "--replay-every", "15",
                               "--warm-up", "15", "--timeout", "300", "--json", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["five_xx"] == 0, printed
    assert figures["unfinished"] == 0, printed
    assert figures["replays"] >= 2 and figures["replays_identical"] == figures["replays"], printed
    assert figures["workers_alive"] == [True], printed
    routes = figures["by_route"]
    for route in ("/sd", "/generate", "/generate-xl", "/sdapi/v1/txt2img", "/v1/images/generations"):
        assert routes.get(route, {}).get("200", 0) >= 1, (route, printed)
    assert routes["/sd (rate-limited key)"].get("429", 0) >= 1, printed
    assert routes["/sd (wrong key)"].keys() == {"403"}, printed
    rss = figures["rss_mb"]
    assert rss["growth"] is not None and rss["growth"] < 300, printed
    assert status == 0, printed
