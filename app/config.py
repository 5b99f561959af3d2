"""Server settings: command-line flags and `CRAFTSERVE_*` environment variables.

Every tunable of the server lives here, validated once at start-up.
"""

from __future__ import annotations

import ipaddress
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.ratelimit import parse_rate_limit


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRAFTSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    models: Path = Path("models.yaml")
    # Where clients reach the server, e.g. "https://images.example.com/base": every URL an
    # answer carries (/generate's images, OpenAI `url`, the job API's URLs) starts with it.
    # Unset: built from each request's scheme and Host header, which a client chooses
    # (app.api.urls); set it on any server reached through a name or a proxy.
    public_url: str | None = None

    # Auth. Keys from CRAFTSERVE_API_KEYS (comma-separated) and/or a file with one key a line.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    allow_anonymous: bool = False
    # Requests per period for every key without its own limit in the keys file (`KEY  10/60s`):
    # e.g. "10/60s", "100/1h"; unset or "unlimited": no limit.
    rate_limit: str | None = None
    # Failed key checks one client address may make a minute before it is answered 429 for
    # the rest of that minute (0: no limit). Other addresses are never affected.
    auth_failures_per_minute: int = Field(30, ge=0)
    # Reloads of the models file (POST /admin/reload, A1111's refresh routes; admin keys only)
    # are coalesced: a rescan begins at least this long after the previous one ended, and the
    # requests that come meanwhile share it (0: back to back, still one at a time).
    reload_interval_s: float = Field(2.0, ge=0)

    # Who the client is, and which names it may use for the server (docs/security.md).
    # Proxies whose X-Forwarded-For (and X-Forwarded-Proto) are believed: IP addresses or
    # networks, comma-separated, or "*" (any peer: only when nothing but the proxy can reach the
    # server). Unset: none; the client is the connection's peer, whatever headers it sends.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Host header values (names or addresses, without the port; "*.example.com" covers its
    # subdomains; "*" any) the server answers; others get 400 (against DNS rebinding). Unset:
    # the loopback names (localhost, 127.0.0.1, ::1) when HOST is a loopback address, else any.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Limits at the edge (app.api.edge), before any parsing: body bytes (413), seconds for
    # the body to arrive (408), URL bytes (414), header bytes in all (431).
    max_body_bytes: int = Field(2 * 2**20, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)
    max_url_bytes: int = Field(8192, ge=256)
    max_header_bytes: int = Field(16384, ge=1024)
    # Images clients send (app.image_inputs): base64 or data: URLs in JSON, files in multipart
    # forms, http(s) URLs where allowed. Each image (a mask too) is at most max_image_bytes
    # once decoded from base64 and at most max_image_pixels (width x height, read from its
    # header before any pixel is decoded: a 100 kB PNG may declare 20000x20000). The pixel cap
    # stays below Pillow's own decompression-bomb limit (89 million pixels) so that ours
    # always speaks first.
    max_image_bytes: int = Field(16 * 2**20, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, le=8192 * 8192)
    # The body cap of the routes that take images (/img2img, /upscale, /sdapi/v1/img2img,
    # /sdapi/v1/extra-*, /v1/images/edits and /variations, /jobs; app.api.edge.IMAGE_ROUTES),
    # instead of max_body_bytes. Unset: room for four images at max_image_bytes as base64
    # (4/3 of the bytes, plus line breaks and a data: prefix) on top of max_body_bytes for the
    # rest: an init image and its mask, or a few images of a batch (about 90 MiB by default).
    # The edge reads a body whole before the route parses it, so this is memory per request.
    max_image_body_bytes: int | None = Field(None, ge=1024)
    # http(s) URLs given instead of image data are fetched only when this is on (off: a 422
    # naming this setting). Then: only hosts matching image_url_hosts when it is set (names,
    # "*.example.com" for its subdomains, "*" any); never a host that resolves to a loopback,
    # private, link-local, multicast, unspecified or reserved address (every address of the
    # name, again after each redirect, at most 3 redirects) unless the host is named in
    # image_url_private_hosts (names, addresses or networks such as 10.0.0.0/8); the body at
    # most max_image_bytes (counted while it streams), the whole fetch within image_url_timeout_s.
    allow_image_urls: bool = False
    image_url_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_url_private_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_url_timeout_s: float = Field(10.0, gt=0)
    # Connections (uvicorn): keep-alive connections close this long after a response; any
    # connection with no request in progress for idle_timeout_s on end (one that never sends
    # its request head) is closed; more open connections than max_connections (0: no limit;
    # uvicorn counts idle ones too) are answered 503; the listen backlog (craftserve serve).
    keep_alive_s: float = Field(5.0, gt=0)
    idle_timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(0, ge=0)
    backlog: int = Field(2048, ge=1)

    # Request limits.
    max_prompt_length: int = Field(2000, ge=1, description="characters, prompt and negative prompt")
    # Chunks of 75 tokens a prompt (and a negative prompt) may encode to; each BREAK starts one.
    # Each is another pass of the text encoders and 77 more tokens for every denoising step.
    max_prompt_chunks: int = Field(8, ge=1)
    max_loras: int = Field(5, ge=0)

    # Queue and batching.
    max_queue: int = Field(64, ge=1, description="jobs waiting at most; more answer 503")
    # Jobs one key (or one anonymous address) may have waiting at once; past it that key is
    # answered 429 and the others still find room. A key's `queue=N` in the keys file sets its
    # own. Unset: a quarter of max_queue (at least 1). At most max_queue.
    max_queue_per_key: int | None = Field(None, ge=1)
    queue_deadline_s: float = Field(300.0, gt=0, description="a job waiting longer is answered 503")
    max_batch: int = Field(4, ge=1)
    batch_window_ms: float = Field(25.0, ge=0)
    # On the CPU, run each job of a batch through the networks with its own rows, so its
    # bytes equal the job run alone (CPU kernels round by batch shape). False: throughput.
    cpu_exact_batches: bool = True

    # Devices and models.
    # 'auto' (every CUDA GPU, else the CPU) or a list such as 'cuda:0,cuda:1' or 'cpu,cpu'
    devices: str = "auto"
    max_models_per_device: int = Field(2, ge=1)
    lora_cache_size: int = Field(8, ge=1)
    load_retry_s: float = Field(60.0, ge=0)  # a failed model load is retried after this pause
    allow_downloads: bool = True  # fetch missing weights from the Hugging Face Hub
    # What the server keeps between runs (today: hashes.json, the sha256 of each weight file
    # by path, size and time, app.file_hashes). Unset: $XDG_CACHE_HOME/craftserve, else
    # ~/.cache/craftserve; "none": nothing is kept (large files are hashed at every start).
    cache_dir: Path | None = None
    compile: bool = False  # torch.compile the UNet and VAE on CUDA (warm-up before /ready)
    # Batch sizes the load's warm-up runs (with compile: compiles) before /ready, e.g. "1,2,4";
    # unset: every size 1..max_batch. A batch of another size compiles on its first run.
    warm_batches: Annotated[list[int], NoDecode] = Field(default_factory=list)
    # A file of inductor's compiled artifacts (docs/gpu-path.md): loaded before a compiled
    # model's warm-up, written after it. Unset: only inductor's own cache (TORCHINDUCTOR_CACHE_DIR).
    compile_cache: Path | None = None

    # AUTOMATIC1111 dialect (/sdapi/v1): its own limits, wider than VisionCraft's ranges.
    a1111_max_size: int = Field(2048, ge=64, description="pixels, width and height")
    a1111_max_steps: int = Field(150, ge=1)
    a1111_max_images: int = Field(8, ge=1, description="batch_size x n_iter of one request")
    # ControlNet units a request may send (the extension's control_net_unit_count)
    controlnet_max_units: int = Field(3, ge=0, description="ControlNet units a request may use")

    # OpenAI images dialect (/v1): images a request (`n`), and other model names (e.g.
    # dall-e-3) mapped to served models: "dall-e-3=sdxl-base,dall-e-2=sd15" or a JSON object.
    openai_max_images: int = Field(4, ge=1)
    openai_model_aliases: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)

    shutdown_grace_s: float = Field(30.0, ge=0)
    # Images kept for the URLs `POST /generate`, OpenAI url answers and the job API answer with:
    # at most this much in all, and per key (each key's oldest go first once it is past its own
    # budget; past the whole, the key that holds the most loses its oldest). Per key unset: a
    # quarter of the whole (at least 1 MB).
    image_store_mb: int = Field(256, ge=1)
    image_store_mb_per_key: int | None = Field(None, ge=1)
    # The job API (POST /jobs): how long a finished job (and its image) is kept, how many jobs
    # are tracked at most in all and per key (a key past its own budget forgets its oldest
    # finished jobs; past the whole, the key with the most finished jobs does; per key unset: a
    # quarter of the whole, at least 1), SSE subscribers per job, and events buffered per
    # subscriber (a slow reader loses progress events past this, never the final one).
    job_ttl_s: float = Field(3600.0, gt=0)
    max_tracked_jobs: int = Field(10000, ge=1)
    max_tracked_jobs_per_key: int | None = Field(None, ge=1)
    job_max_subscribers: int = Field(100, ge=1)
    job_subscriber_buffer: int = Field(16, ge=2)
    preview_every: int = Field(5, ge=1, description="steps between previews of a job that asks")
    # Ray Serve (`craftserve serve --ray`, extra `craftserve[ray]`; docs/scale-out.md). Replicas
    # of the generation deployment, each running the engine on one device: between min and
    # max (autoscaled on ongoing requests when max > min, aiming at target_ongoing a replica);
    # GPUs and CPUs a replica reserves (GPUs unset: 1 where the cluster has GPUs, else 0, a CPU
    # replica); calls waiting at the ingress for a replica (one takes max(max_queue, max_batch))
    # (past it: 503). address: unset starts a local Ray; "auto" or "ray://host:10001" joins one.
    ray_address: str | None = None
    ray_min_replicas: int = Field(1, ge=1)
    ray_max_replicas: int = Field(1, ge=1)
    ray_gpus_per_replica: float | None = Field(None, ge=0)
    ray_cpus_per_replica: float = Field(1.0, ge=0)
    ray_target_ongoing: float = Field(2.0, gt=0)
    ray_max_queued: int = Field(64, ge=0)
    # how long the load must stay above (below) target before a replica is added (removed)
    ray_upscale_delay_s: float = Field(5.0, ge=0)
    ray_downscale_delay_s: float = Field(60.0, ge=0)
    # The ingress's routing (app.cluster.dispatch): calls one replica has at once (running and
    # in its own queue; unset: 2 x max_batch, what it can batch soon), the rest waiting at the
    # ingress in the fair queue; a model whose waiting jobs would take its replicas longer than
    # replicate_after_s to drain is loaded on another replica too; a model used on a replica
    # within model_stay_s is not evicted there for another replica's hot model.
    ray_replica_slots: int | None = Field(None, ge=1)
    ray_replicate_after_s: float = Field(2.0, ge=0)
    ray_model_stay_s: float = Field(60.0, ge=0)

    log_level: str = "info"
    # Prompts are users' data: the job log line carries them only when this is on. API keys
    # are never logged (a hash label stands for them).
    log_prompts: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("trusted_proxies", "allowed_hosts", "image_url_hosts", "image_url_private_hosts",
                     mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            if item == "*":
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network: write addresses or "
                                 "networks (10.0.0.5, 10.0.0.0/8, ::1), comma-separated, or *") from None
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, value: list[str]) -> list[str]:
        names = []
        for item in value:
            name = item.lower()
            if name.startswith("["):  # [::1] or [::1]:8000
                name = name[1:].partition("]")[0]
            elif name.count(":") == 1:  # a port is not part of the name
                name = name.partition(":")[0]
            names.append(name)
        return names

    @field_validator("image_url_hosts", "image_url_private_hosts")
    @classmethod
    def _lower_url_hosts(cls, value: list[str]) -> list[str]:
        names = []
        for item in value:
            name = item.strip().lower()
            if name.startswith("[") and name.endswith("]"):  # [::1]: an IPv6 address as in a URL
                name = name[1:-1]
            if not name or (("/" in name or ":" in name) and not _is_network(name)):
                raise ValueError(f"{item!r} is not a host name, address or network: write names "
                                 "(images.example.com, *.example.com), addresses or networks "
                                 "(10.0.0.5, 10.0.0.0/8, ::1), comma-separated, without scheme or port")
            names.append(name)
        return names

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        text = value.strip()
        parts = urlsplit(text)
        problem = (
            "its scheme must be http or https" if parts.scheme.lower() not in ("http", "https")
            else "it names no host" if not parts.hostname
            else "it must not have a query (?...)" if parts.query or text.endswith("?")
            else "it must not have a fragment (#...)" if parts.fragment or "#" in text
            else "it must not hold a user or password" if parts.username or parts.password
            else None
        )
        if problem is not None:
            raise ValueError(f"CRAFTSERVE_PUBLIC_URL {text!r}: {problem}; give the address clients "
                             "reach the server at, e.g. https://images.example.com or "
                             "https://example.com/images")
        return text.rstrip("/")

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)  # ValueError: the format, with examples
        return value

    @field_validator("warm_batches", mode="before")
    @classmethod
    def _split_batches(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("openai_model_aliases", mode="before")
    @classmethod
    def _parse_aliases(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("use name=model pairs, comma-separated, or a JSON object")
            return {k.strip(): v.strip() for k, v in pairs}
        return value

    @model_validator(mode="after")
    def _per_key_shares(self) -> Settings:
        """Each per-key budget defaults to a quarter of its whole (at least 1) and is at most
        the whole: one key alone can never take everything."""
        for share, whole in (("max_queue_per_key", "max_queue"),
                             ("image_store_mb_per_key", "image_store_mb"),
                             ("max_tracked_jobs_per_key", "max_tracked_jobs")):
            total = getattr(self, whole)
            value = getattr(self, share)
            if value is None:
                setattr(self, share, max(1, total // 4))
            elif value > total:
                raise ValueError(
                    f"CRAFTSERVE_{share.upper()} ({value}) is above CRAFTSERVE_{whole.upper()} "
                    f"({total}): one key's share is at most the whole; leave it unset for a "
                    "quarter of it")
        return self

    @model_validator(mode="after")
    def _check_replicas(self) -> Settings:
        if self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError(
                f"CRAFTSERVE_RAY_MAX_REPLICAS ({self.ray_max_replicas}) is below "
                f"CRAFTSERVE_RAY_MIN_REPLICAS ({self.ray_min_replicas}): the most replicas must "
                "be at least the fewest (equal: a fixed number, no autoscaling)"
            )
        return self

    def cache_folder(self) -> Path | None:
        """Where the server keeps its caches (None: nowhere, CRAFTSERVE_CACHE_DIR=none)."""
        if self.cache_dir is not None:
            return None if str(self.cache_dir).lower() == "none" else self.cache_dir.expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "craftserve"

    @model_validator(mode="after")
    def _check_warm_batches(self) -> Settings:
        for size in self.warm_batches:
            if not 1 <= size <= self.max_batch:
                raise ValueError(
                    f"CRAFTSERVE_WARM_BATCHES: batch size {size} is outside 1..CRAFTSERVE_MAX_BATCH "
                    f"({self.max_batch}): list batch sizes the queue can form, e.g. 1,2,"
                    f"{self.max_batch}, or leave it unset for all of them")
        return self

    def warm_batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes a model's warm-up runs: WARM_BATCHES, else 1..MAX_BATCH."""
        return tuple(sorted(set(self.warm_batches))) or tuple(range(1, self.max_batch + 1))

    def all_api_keys(self) -> list[str]:
        """Keys from the setting and the keys file (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(
                    f"CRAFTSERVE_API_KEYS_FILE: cannot read {self.api_keys_file}: {exc.strerror}"
                ) from exc
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


@lru_cache
def get_settings() -> Settings:
    return Settings()
