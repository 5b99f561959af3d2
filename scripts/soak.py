#!/usr/bin/env python3
"""Soak: a mixed workload for a given time against a craftserve server.

Drives, from a few concurrent clients: every dialect the server has (VisionCraft /sd,
/generate, /generate-xl; A1111 /sdapi/v1/txt2img; OpenAI /v1/images/generations; a /jobs API
when /openapi.json lists one), both tiny models, LoRA sets, samplers and schedules, sizes,
seeds, A1111 interrupts mid-job, client disconnects mid-job (the connection closed before the
answer), bad bodies, and a key past its rate limit. A fixed job is replayed every
`--replay-every` seconds; its bytes must never change.

It prints requests by route and status, the 5xx count (target 0), requests that never finished
within the client timeout (target 0), p50/p99 per route, the server's RSS after warm-up and at
the end (target: growth under 50 MB over 10 minutes), and the replays. Exit status 1 when a
target other than RSS is missed. `--json PATH` writes the figures as JSON.

Usage (from the repository root):
  .venv/bin/python scripts/soak.py --start --seconds 600            # its own server, tiny models
  .venv/bin/python scripts/soak.py --url http://host:8000 --key K [--cancel-key C] [--pid PID] --seconds 600

With --start it makes tiny LoRAs (tests/lora_files.py) in a lora_dirs folder, and a keys file
with the soak key (no limit), a key limited to 2/60s and a key for interrupts, and runs
`python -m app.cli serve` in a subprocess on loopback. Against another server, --limited-key
names a rate-limited key (else that part is skipped), --cancel-key a key for the A1111
interrupts alone (an interrupt stops every job of its key; without it they are skipped) and
--pid the server process for RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY, LIMITED_KEY, CANCEL_KEY = "soak-key-8f2c1e", "soak-limited-5d93ab", "soak-cancel-a61f07"
REPLAY = {"model": "tiny-sdxl", "prompt": "a lighthouse at dusk, replayed", "steps": 4,
          "width": 64, "height": 64, "seed": 4242, "sampler": "DPM++ 2M Karras"}
TIMEOUT = 120.0  # a request not answered by then "never finished" (--timeout)


# ---- its own server -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(ROOT))
    from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl
    from tests.lora_files import write_kohya_lora, write_peft_lora

    loras = workdir / "loras"
    loras.mkdir()
    xl, sd15 = build_tiny_sdxl(), build_tiny_sd15()
    write_peft_lora(xl, loras / "xl-style.safetensors", seed=1)
    write_kohya_lora(xl, loras / "xl-detail.safetensors", seed=2)
    write_peft_lora(sd15, loras / "sd15-style.safetensors", seed=3)
    models = workdir / "models.yaml"
    models.write_text("models:\n"
                      "  tiny-sdxl: {source: builtin:tiny-sdxl, preload: true}\n"
                      "  tiny-sd15: {source: builtin:tiny-sd15, preload: true}\n"
                      f"lora_dirs: [{loras}]\n", encoding="utf-8")
    keys = workdir / "keys.txt"
    keys.write_text(f"{KEY}\n{LIMITED_KEY}  2/60s\n{CANCEL_KEY}\n", encoding="utf-8")
    port = free_port()
    # The wrong-key requests all come from 127.0.0.1, like everything else here: with the
    # per-address throttle of failed keys on (its own tests are in tests/test_edge.py), a fast
    # machine passes 30 failures a minute and every client, valid keys too, gets 429.
    env = dict(os.environ, CRAFTSERVE_API_KEYS_FILE=str(keys), CRAFTSERVE_LOG_LEVEL="warning",
               CRAFTSERVE_MAX_QUEUE="256", CRAFTSERVE_AUTH_FAILURES_PER_MINUTE="0")
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                             "--models", str(models)], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up; see {workdir / 'server.log'}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server was not ready in 300 s")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---- the workload ---------------------------------------------------------------------------
class Soak:
    def __init__(self, url: str, key: str, *, limited_key: str | None, cancel_key: str | None,
                 seed: int) -> None:
        self.url = url
        self.key = key
        self.limited_key = limited_key
        self.cancel_key = cancel_key
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.unfinished: list[str] = []
        self.five_xx: list[str] = []
        self.replays: list[dict] = []
        with httpx.Client(base_url=url, timeout=30) as c:
            self.paths = set(c.get("/openapi.json").json().get("paths", {}))
            self.samplers = c.get("/sd/samplers").json()
            self.comfy_samplers = c.get("/samplers-xl").json()
            self.comfy_schedulers = c.get("/schedulers-xl").json()
            self.models = {"sdxl": c.get("/sd/models-sdxl").json(), "sd": c.get("/sd/models-sd").json()}
            self.loras = {"sdxl": c.get("/sd/loras-sdxl").json(), "sd": c.get("/sd/loras-sd").json()}
        self.jobs_api = "/jobs" in self.paths

    # -- bookkeeping
    def record(self, route: str, status: str, seconds: float | None, detail: str = "") -> None:
        with self.lock:
            self.counts[(route, status)] += 1
            if seconds is not None and status.isdigit():
                self.latency[route].append(seconds)
            if status.isdigit() and int(status) >= 500:  # 503 too: none is due under this load
                self.five_xx.append(f"{route} {status} {detail[:200]}")
            if status == "unfinished":
                self.unfinished.append(f"{route} {detail[:200]}")

    def call(self, client: httpx.Client, route: str, method: str, path: str,
             **kwargs) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            answer = client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            self.record(route, "unfinished", None, f"timeout: {exc!r}")
            return None
        except httpx.HTTPError as exc:
            self.record(route, "unfinished", None, f"transport: {exc!r}")
            return None
        self.record(route, str(answer.status_code), time.perf_counter() - started, answer.text[:300])
        return answer

    # -- random requests
    def family_and_model(self) -> tuple[str, str]:
        family = self.rng.choice([f for f in ("sdxl", "sd") if self.models[f]])
        return family, self.rng.choice(self.models[family])

    def lora_set(self, family: str) -> dict[str, float]:
        names = self.loras[family]
        count = self.rng.choice([0, 0, 1, min(2, len(names))])
        chosen = self.rng.sample(names, min(count, len(names)))
        return {n: round(self.rng.uniform(0.3, 1.2), 2) for n in chosen}

    def sd_body(self, key: str | None = None) -> dict:
        family, model = self.family_and_model()
        return {"token": key or self.key, "model": model, "prompt": f"soak {self.rng.randrange(10**6)}",
                "negative_prompt": self.rng.choice(["", "blurry"]),
                "sampler": self.rng.choice(self.samplers), "steps": self.rng.randint(2, 6),
                "width": self.rng.choice([64, 72, 96]), "height": self.rng.choice([64, 80]),
                "seed": self.rng.randrange(2**32), "cfg_scale": self.rng.choice([1.5, 5, 7.5]),
                "loras": self.lora_set(family)}

    def op_sd(self, c: httpx.Client) -> None:
        self.call(c, "/sd", "POST", "/sd", json=self.sd_body())

    def op_generate(self, c: httpx.Client, xl: bool) -> None:
        b = self.sd_body()
        b["image_count"] = self.rng.randint(1, 2)
        if xl:
            b["sampler"] = self.rng.choice(self.comfy_samplers)
            b["scheduler"] = self.rng.choice(self.comfy_schedulers)
        route = "/generate-xl" if xl else "/generate"
        answer = self.call(c, route, "POST", route, json=b)
        if answer is not None and answer.status_code == 200:
            for url in answer.json()["images"]:
                self.call(c, "/images/{key}.png", "GET", urlsplit(url).path)

    def op_a1111(self, c: httpx.Client) -> None:
        b = self.sd_body()
        self.call(c, "/sdapi/v1/txt2img", "POST", "/sdapi/v1/txt2img",
                  headers={"Authorization": f"Bearer {self.key}"},
                  json={"prompt": b["prompt"] + "".join(f" <lora:{n}:{w}>" for n, w in b["loras"].items()),
                        "negative_prompt": b["negative_prompt"], "steps": b["steps"],
                        "width": b["width"], "height": b["height"], "seed": b["seed"],
                        "cfg_scale": b["cfg_scale"], "sampler_name": b["sampler"],
                        "batch_size": self.rng.choice([1, 1, 2]),
                        "override_settings": {"sd_model_checkpoint": b["model"]}})

    def op_openai(self, c: httpx.Client) -> None:
        _, model = self.family_and_model()
        fmt = self.rng.choice(["b64_json", "url"])
        answer = self.call(c, "/v1/images/generations", "POST", "/v1/images/generations",
                           headers={"Authorization": f"Bearer {self.key}"},
                           json={"model": model, "prompt": f"soak {self.rng.randrange(10**6)}",
                                 "size": "64x64", "n": self.rng.choice([1, 2]),
                                 "response_format": fmt})
        if answer is not None and answer.status_code == 200 and fmt == "url":
            for item in answer.json()["data"]:
                self.call(c, "/v1/images/files/{key}", "GET", urlsplit(item["url"]).path)

    def op_jobs(self, c: httpx.Client) -> None:
        """The /jobs API, when the server has one: submit, then poll the job until it ends."""
        answer = self.call(c, "/jobs", "POST", "/jobs", json=self.sd_body(),
                           headers={"Authorization": f"Bearer {self.key}"})
        if answer is None or answer.status_code not in (200, 201, 202):
            return
        job = answer.json().get("id") or answer.json().get("job_id")
        deadline = time.monotonic() + TIMEOUT
        while job and time.monotonic() < deadline:
            state = self.call(c, "/jobs/{id}", "GET", f"/jobs/{job}",
                              headers={"Authorization": f"Bearer {self.key}"})
            if state is None or state.status_code != 200:
                return
            if str(state.json().get("status", "")).lower() not in ("queued", "running", "pending"):
                return
            time.sleep(0.2)

    def op_interrupt(self, c: httpx.Client) -> None:
        """An A1111 txt2img stopped by POST /sdapi/v1/interrupt with its key mid-job (a key
        of its own, else skipped: an interrupt stops every job of its key)."""
        if not self.cancel_key or self.cancel_key == self.key:
            return
        headers = {"Authorization": f"Bearer {self.cancel_key}"}
        b = self.sd_body()
        body = {"prompt": b["prompt"], "steps": 30, "width": 96, "height": 96, "seed": b["seed"],
                "override_settings": {"sd_model_checkpoint": b["model"]}}
        done = threading.Event()

        def interrupt() -> None:
            time.sleep(self.rng.uniform(0.05, 0.4))
            with httpx.Client(base_url=self.url, timeout=TIMEOUT) as other:
                self.call(other, "/sdapi/v1/interrupt", "POST", "/sdapi/v1/interrupt", headers=headers)
            done.set()

        threading.Thread(target=interrupt, daemon=True).start()
        self.call(c, "/sdapi/v1/txt2img (interrupted)", "POST", "/sdapi/v1/txt2img",
                  headers=headers, json=body)
        done.wait(TIMEOUT)

    def op_disconnect(self, c: httpx.Client) -> None:
        """A /sd request whose client closes the connection before the answer."""
        b = self.sd_body()
        b["steps"] = 20
        data = json.dumps(b).encode()
        parts = urlsplit(self.url)
        try:
            with socket.create_connection((parts.hostname, parts.port or 80), timeout=10) as s:
                s.sendall(f"POST /sd HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode()
                          + b"Content-Type: application/json\r\n"
                          + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                time.sleep(self.rng.uniform(0.02, 0.5))
            self.record("/sd (client disconnected)", "closed", None)
        except OSError as exc:
            self.record("/sd (client disconnected)", "unfinished", None, repr(exc))

    BAD_BODIES = [
        ("application/json", b"{not json"),
        ("application/json", b'{"prompt": "x", "steps": 999}'),
        # small sizes: the A1111 dialect ignores an unknown field and takes a null prompt as
        # empty, so this one is valid there (and would otherwise be 512x512, 50 steps)
        ("application/json", b'{"model": 5, "prompt": null, "width": 64, "height": 64, "steps": 2}'),
        ("application/json", b'{"steps": NaN, "prompt": "x"}'),
        ("text/plain", b"steps=4"),
        ("application/json", b"[" * 5000 + b"]" * 5000),
        ("application/json", b'{"prompt": "\xff\xfe invalid utf-8"}'),
    ]

    def op_bad(self, c: httpx.Client) -> None:
        kind, raw = self.rng.choice(self.BAD_BODIES)
        raw = raw.replace(b'{"', f'{{"token": "{self.key}", "'.encode(), 1) if raw.startswith(b'{"') else raw
        route = self.rng.choice(["/sd", "/generate", "/sdapi/v1/txt2img", "/v1/images/generations"])
        self.call(c, f"{route} (bad body)", "POST", route, content=raw,
                  headers={"Content-Type": kind, "Authorization": f"Bearer {self.key}"})

    def op_limited(self, c: httpx.Client) -> None:
        """Three requests at once with the rate-limited key (2/60s with --start): the third is
        past its limit however long the others take (at once: sent one after another on a slow
        machine, the bucket refills between them)."""
        if not self.limited_key:
            return
        bodies = [{**self.sd_body(self.limited_key), "steps": 2} for _ in range(3)]
        threads = [threading.Thread(target=self.call, daemon=True,
                                    args=(c, "/sd (rate-limited key)", "POST", "/sd"),
                                    kwargs={"json": b}) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT + 10)

    def op_wrong_key(self, c: httpx.Client) -> None:
        self.call(c, "/sd (wrong key)", "POST", "/sd", json=self.sd_body("not-a-key"))

    def replay(self, c: httpx.Client) -> None:
        answer = self.call(c, "/sd (replay)", "POST", "/sd", json={"token": self.key, **REPLAY})
        data = answer.content if answer is not None and answer.status_code == 200 else None
        with self.lock:
            first = next((r["bytes"] for r in self.replays if r["bytes"] is not None), None)
            self.replays.append({"at": time.monotonic(), "bytes": data,
                                 "identical": data is not None and (first is None or data == first)})

    def client_loop(self, deadline: float, ops: list, tour: list) -> None:
        """`tour` first (so every kind of request is made at least once however slow the
        machine), then requests drawn at random by weight until the deadline."""
        with httpx.Client(base_url=self.url, timeout=TIMEOUT) as c:
            for op in tour:
                op(c)
            while time.monotonic() < deadline:
                op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
                op(c)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict:
    proc = None
    workdir = None
    url, key, pid = args.url, args.key, args.pid
    # An interrupt stops every job of its key: with the main key it would stop the other
    # clients' requests too, so against another server the interrupts need a key of their own.
    limited, cancel = args.limited_key, args.cancel_key
    if args.start:
        workdir = tempfile.TemporaryDirectory(prefix="soak-")
        proc, url = start_server(Path(workdir.name))
        key, limited, cancel, pid = KEY, LIMITED_KEY, CANCEL_KEY, proc.pid
    try:
        soak = Soak(url, key, limited_key=limited, cancel_key=cancel, seed=args.seed)
        ops = [(soak.op_sd, 6), (lambda c: soak.op_generate(c, False), 2),
               (lambda c: soak.op_generate(c, True), 2), (soak.op_a1111, 3), (soak.op_openai, 3),
               (soak.op_interrupt, 1), (soak.op_disconnect, 1), (soak.op_bad, 2),
               (soak.op_limited, 1), (soak.op_wrong_key, 1)]
        if soak.jobs_api:
            ops.append((soak.op_jobs, 3))
        started = time.monotonic()
        deadline = started + args.seconds
        warm_up = min(args.warm_up, args.seconds / 4)
        figures: dict = {"url": url, "seconds": args.seconds, "clients": args.clients,
                         "jobs_api": soak.jobs_api}
        every = [op for op, _ in ops]
        threads = [threading.Thread(target=soak.client_loop, daemon=True,
                                    args=(deadline, ops, every[i::args.clients]))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        rss: list[tuple[float, float]] = []
        rss_start = None
        with httpx.Client(base_url=url, timeout=TIMEOUT) as replay_client:
            next_replay = started
            while time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_replay:
                    soak.replay(replay_client)
                    next_replay = now + args.replay_every
                value = rss_mb(pid)
                if value is not None:
                    rss.append((now - started, value))
                    if rss_start is None and now - started >= warm_up:
                        rss_start = value
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            soak.replay(replay_client)  # one more at the very end
        for t in threads:
            t.join(TIMEOUT + 30)
        alive = [t for t in threads if t.is_alive()]
        if alive:
            soak.record("client threads", "unfinished", None, f"{len(alive)} still running")
        with httpx.Client(base_url=url, timeout=30) as c:
            ready = c.get("/ready", headers={"Authorization": f"Bearer {KEY}"}).json()
        rss_end = rss_mb(pid)
        routes = sorted({r for r, _ in soak.counts})
        figures.update({
            "wall_s": round(time.monotonic() - started, 1),
            "requests": sum(soak.counts.values()),
            "by_route": {r: {s: n for (rr, s), n in sorted(soak.counts.items()) if rr == r} for r in routes},
            "latency_s": {r: {"n": len(v), "p50": round(statistics.median(v), 3),
                              "p99": round(percentile(v, 0.99), 3)}
                          for r, v in sorted(soak.latency.items()) if v},
            "five_xx": len(soak.five_xx), "five_xx_examples": soak.five_xx[:10],
            "unfinished": len(soak.unfinished), "unfinished_examples": soak.unfinished[:10],
            "replays": len(soak.replays), "replays_identical": sum(r["identical"] for r in soak.replays),
            "rss_mb": {"after_warm_up": rss_start, "end": rss_end,
                       "max": max((v for _, v in rss), default=None),
                       "growth": None if rss_start is None or rss_end is None
                       else round(rss_end - rss_start, 1), "warm_up_s": warm_up},
            "workers_alive": [w["alive"] for w in ready.get("workers", [])],
        })
        return figures
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if workdir is not None:
            workdir.cleanup()


def report(f: dict) -> str:
    lines = [f"soak: {f['wall_s']} s against {f['url']}, {f['clients']} clients, "
             f"{f['requests']} requests (jobs API: {'yes' if f['jobs_api'] else 'absent'})", "",
             f"{'route':42} {'statuses':44} {'p50 s':>7} {'p99 s':>7}"]
    for route, statuses in f["by_route"].items():
        lat = f["latency_s"].get(route)
        text = " ".join(f"{s}:{n}" for s, n in statuses.items())
        lines.append(f"{route:42} {text:44} {lat['p50'] if lat else '-':>7} {lat['p99'] if lat else '-':>7}")
    r = f["rss_mb"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    lines += ["",
              f"5xx: {f['five_xx']} (target 0) {f['five_xx_examples']}",
              f"never finished: {f['unfinished']} (target 0) {f['unfinished_examples']}",
              f"replays identical: {f['replays_identical']}/{f['replays']} (target all)",
              f"server RSS MB: after {r['warm_up_s']:.0f} s warm-up {fmt(r['after_warm_up'])}, "
              f"end {fmt(r['end'])}, max {fmt(r['max'])}, growth {fmt(r['growth'])} "
              "(target < 50 over 10 min)",
              f"workers alive at the end: {f['workers_alive']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--url", help="a running server (else --start)")
    parser.add_argument("--key", default=KEY, help="an API key without a rate limit")
    parser.add_argument("--limited-key", help="a key with a small rate limit (with --url)")
    parser.add_argument("--cancel-key", help="a key used only for the A1111 interrupts (with "
                        "--url; else they are skipped)")
    parser.add_argument("--pid", type=int, help="the server's process id, for RSS (with --url)")
    parser.add_argument("--start", action="store_true",
                        help="start its own server (python -m app.cli serve) on the tiny models")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--replay-every", type=float, default=60.0)
    parser.add_argument("--warm-up", type=float, default=60.0,
                        help="RSS growth is measured from this many seconds (at most a quarter of the run)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help="seconds a request may take before it counts as never finished")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.start and not args.url:
        parser.error("give --url (a running server) or --start")
    TIMEOUT = args.timeout
    figures = run(args)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    missed = figures["five_xx"] or figures["unfinished"] or \
        figures["replays_identical"] != figures["replays"] or not all(figures["workers_alive"])
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
