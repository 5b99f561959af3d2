"""Whether weights may be fetched from the Hugging Face Hub now: asked once, remembered.

A model whose weights are not in the local Hugging Face cache is downloaded from the Hub. On a
machine without network, huggingface_hub retries each request five times with a growing pause
(about 23 s and a dozen warning lines per file; longer where connections time out, and where a
firewall accepts connections but never answers, the revision lookup diffusers makes first, which
has no timeout, held the worker for over ten minutes), and the worker's other models waited.
Instead, the engine asks the Hub once (one request, a short timeout, no retries) the first time
a model is missing from the cache; while the Hub does not answer, weights are looked up in the
cache only (`local_files_only`), and one warning says which models wait for weights and how to
get them. The answer is kept for LOAD_RETRY_S (a later load of a waiting model asks again) and
forgotten on a reload (SIGHUP, POST /admin/reload), so weights copied in or a network that came
back are noticed without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from app.errors import Unavailable
from app.registry import ModelSpec

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0  # one request; a Hub that takes longer to answer is as good as unreachable


class WeightsMissing(Exception):
    """A model's weights are not in the local cache and the Hub cannot be asked now."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WaitingForWeights(Unavailable):
    """The 503 of a model whose weights are not here while the Hub cannot be reached (or
    downloads are off). The Hub notice has already said so in the log, once for all models."""


def vae_is_repo(spec: ModelSpec) -> bool:
    return (bool(spec.vae) and Path(spec.vae).suffix.lower() != ".safetensors"
            and not Path(spec.vae).expanduser().exists())


def hub_repos(spec: ModelSpec) -> list[str]:
    """The Hub repositories the model is read from: its source, its VAE."""
    repos = [spec.source] if spec.kind == "hub" else []
    if vae_is_repo(spec):
        repos.append(spec.vae)  # type: ignore[arg-type]
    return repos


def _in_cache(repo: str, index_file: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, index_file), str)
    except Exception:  # noqa: BLE001 - an unreadable cache holds nothing
        return False


def missing_repos(spec: ModelSpec) -> list[str]:
    """The model's Hub repositories of which the local cache holds no copy (judged by the
    index file alone: a partial download still fails at load time, and /ready says so)."""
    return [repo for repo in hub_repos(spec)
            if not _in_cache(repo, "model_index.json" if repo == spec.source else "config.json")]


def weights_here(spec: ModelSpec) -> bool:
    """Whether the model can load without a download: built in, a local file or folder, or
    every Hub repository it reads in the local Hugging Face cache."""
    return not missing_repos(spec)


def default_model(models: Mapping[str, ModelSpec]) -> str:
    """The model a request that names none gets (A1111's sd_model_checkpoint until a key
    chooses one, OpenAI's `model` absent or one of OpenAI's own names, VisionCraft's img2img
    `refiner`, the page's preselection): the first model of the models file whose weights are
    here, so on a machine without network or weights the default serves now (the shipped file:
    tiny-sdxl, until sdxl-base's weights are in the cache). None here: the first model. SDXL's
    refiner layout is never the default: it is no job's model."""
    servable = {name: spec for name, spec in models.items() if not spec.refiner_only}
    for name, spec in servable.items():
        if weights_here(spec):
            return name
    return next(iter(servable), "")


def download_commands(repos: list[str]) -> str:
    return " and ".join(f"`hf download {repo}`" for repo in repos)


class HubAccess:
    """Whether a model missing from the cache may be fetched now (`why_not`), for one engine.

    `models` gives the served specs, for the notice's list of models waiting for weights."""

    def __init__(self, *, allow_downloads: bool, recheck_s: float,
                 models: Callable[[], Mapping[str, ModelSpec]],
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.allow_downloads = allow_downloads
        self.recheck_s = recheck_s
        self.timeout_s = timeout_s
        self._models = models
        self._lock = threading.Lock()
        self._answer: tuple[float, str | None] | None = None  # (when, why not; None: reachable)
        self._noticed = False  # the notice for the current spell without the Hub is logged
        self.probes = 0  # requests made to the Hub (for tests and the curious)

    def forget(self) -> None:
        """Ask again next time (a reload: weights may have been copied in, or the network
        come back); a Hub still out of reach is then noticed in the log once more."""
        with self._lock:
            self._answer = None
            self._noticed = False

    def why_not(self, needed_by: str | None = None) -> str | None:
        """None when the Hub may be asked for files now; else why not, as a clause for the
        model's 503 ("the Hugging Face Hub cannot be reached (...)"). `needed_by`: the model
        whose weights were not in the cache, listed in the notice whatever the cache says."""
        with self._lock:  # one probe at a time; the others then read its answer
            reason = self._switched_off()
            probed = reason is None
            if probed:
                reason = self._reachability()
            if reason is not None and not self._noticed:
                self._noticed = True
                self._notice(reason, needed_by, probed)
            elif reason is None and self._noticed:
                self._noticed = False
                logger.info("the Hugging Face Hub answers again: models missing from the cache "
                            "are downloaded when they load")
            return reason

    def _switched_off(self) -> str | None:
        if not self.allow_downloads:
            return "downloads are switched off (CRAFTSERVE_ALLOW_DOWNLOADS=false)"
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1)"
        return None

    def _reachability(self) -> str | None:
        now = time.monotonic()
        if self._answer is not None and now - self._answer[0] < self.recheck_s:
            return self._answer[1]
        reason = self._probe()
        self._answer = (time.monotonic(), reason)
        return reason

    def _probe(self) -> str | None:
        """One HEAD request to the Hub's endpoint (HF_ENDPOINT) through huggingface_hub's own
        HTTP session (its proxy and certificate settings), without its retries."""
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        self.probes += 1
        url = constants.ENDPOINT
        try:
            response = get_session().head(url, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - no answer, whatever the library calls it
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            return f"the Hugging Face Hub cannot be reached ({url}: {detail})"
        if response.status_code >= 500:  # e.g. a proxy that cannot reach it either
            return f"the Hugging Face Hub cannot be reached ({url} answered HTTP {response.status_code})"
        return None

    def _notice(self, reason: str, needed_by: str | None, probed: bool) -> None:
        from huggingface_hub import constants

        models = self._models()
        waiting = {name: missing_repos(spec) for name, spec in models.items()}
        if needed_by in models and not waiting[needed_by]:
            waiting[needed_by] = hub_repos(models[needed_by])
        waiting = {name: repos for name, repos in waiting.items() if repos}
        repos = list(dict.fromkeys(r for rs in waiting.values() for r in rs))
        listed = "; ".join(f"{name} ({', '.join(rs)})" for name, rs in waiting.items()) or "none"
        again = (f" The Hub is asked again on reload and when a waiting model is requested after "
                 f"LOAD_RETRY_S ({self.recheck_s:g} s)." if probed else "")
        logger.warning(
            "%s; models waiting for weights: %s. They answer 503 until their weights are in the "
            "Hugging Face cache (%s); the other models serve now. To get them: where there is "
            "network, run %s and copy that machine's cache (~/.cache/huggingface/hub) here, or "
            "point these models' source: / vae: in the models file at local folders; then reload "
            "(SIGHUP or POST /admin/reload).%s",
            reason[0].upper() + reason[1:], listed, constants.HF_HUB_CACHE,
            download_commands(repos) or "`hf download <repo>`", again,
        )
