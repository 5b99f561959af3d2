"""Rescanning models.yaml and its folders without a restart (SIGHUP, POST /admin/reload).

`plan_reload` reads the models file again, matches the LoRAs to the models (app.engine.lora_fit)
and compares the result with what is served: models added, removed, changed (their entry in
the file, or the files on disk: size and modification time of every file of a local source or
VAE). The Engine applies the plan (Engine.reload): the registry is swapped in one assignment per
table, waiting jobs of removed models are answered, and each worker unloads removed and
changed models between batches, so running jobs finish on the model they started with and
a changed model is loaded afresh on its next use.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.engine.controlnet_fit import match_controlnets
from app.engine.lora_fit import match_loras
from app.registry import ModelSpec, Registry, RegistryError, load_registry

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return []


def fingerprint(spec: ModelSpec) -> Fingerprint:
    """(file, size, mtime) of every local file the model is read from: its source (a folder
    or a single file) and a local VAE. Empty for builtin models and Hub ids."""
    paths: list[Path] = []
    if spec.kind not in ("builtin", "hub"):
        paths.append(Path(spec.source))
    if spec.vae and Path(spec.vae).expanduser().exists():
        paths.append(Path(spec.vae).expanduser())
    prints = []
    for root in paths:
        for file in _files(root):
            try:
                st = file.stat()
            except OSError:
                continue
            prints.append((os.fspath(file), st.st_size, st.st_mtime_ns))
    return tuple(prints)


@dataclass
class ReloadReport:
    """What a reload changed; `summary()` is the log line, `as_dict()` what /ready shows."""

    at: float = field(default_factory=time.time)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    loras_added: list[str] = field(default_factory=list)
    loras_removed: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        if self.error:
            return f"reload failed, nothing changed: {self.error}"
        parts = [f"{label} {', '.join(names)}" for label, names in (
            ("models added:", self.added), ("models removed:", self.removed),
            ("models changed (reloaded on next use):", self.changed),
            ("LoRAs added:", self.loras_added), ("LoRAs removed:", self.loras_removed),
        ) if names]
        return "reload: " + ("; ".join(parts) if parts else "nothing changed")

    def as_dict(self) -> dict:
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "summary": self.summary(),
            "added": self.added, "removed": self.removed, "changed": self.changed,
            "loras_added": self.loras_added, "loras_removed": self.loras_removed,
            "error": self.error,
        }


@dataclass
class ReloadPlan:
    registry: Registry
    fingerprints: dict[str, Fingerprint]
    report: ReloadReport

    def swap_into(self, registry: Registry) -> None:
        """Serve the new tables: one assignment per table, so readers on other threads see
        the old one or the new one, never a mix."""
        registry.models = self.registry.models
        registry.loras = self.registry.loras
        registry.embeddings = self.registry.embeddings
        registry.upscalers = self.registry.upscalers
        registry.controlnets = self.registry.controlnets
        registry.annotators = self.registry.annotators
        registry.styles, registry.styles_file = self.registry.styles, self.registry.styles_file


def plan_reload(current: Registry, prints: Mapping[str, Fingerprint]) -> ReloadPlan:
    """Read the models file again and compare it with `current` (served with `prints`).
    Raises RegistryError when the file is no longer valid (then nothing changes)."""
    fresh = load_registry(current.path)
    match_loras(fresh)
    match_controlnets(fresh)  # and which ControlNet, the same way
    fresh_prints = {name: fingerprint(spec) for name, spec in fresh.models.items()}
    report = ReloadReport()
    for name, spec in fresh.models.items():
        old = current.models.get(name)
        if old is None:
            report.added.append(name)
        elif old != spec or prints.get(name) != fresh_prints[name]:
            report.changed.append(name)
        else:
            report.unchanged.append(name)
    report.removed = [name for name in current.models if name not in fresh.models]
    report.loras_added = sorted(set(fresh.lora_names()) - set(current.lora_names()))
    report.loras_removed = sorted(set(current.lora_names()) - set(fresh.lora_names()))
    return ReloadPlan(fresh, fresh_prints, report)


def reload_into(registry: Registry, prints: Mapping[str, Fingerprint]
                ) -> tuple[ReloadReport, dict[str, Fingerprint] | None]:
    """Read the models file again and swap the new tables into `registry`: the report, and the
    new fingerprints. An invalid file changes nothing: its report says why (logged), and the
    fingerprints are None."""
    try:
        plan = plan_reload(registry, prints)
    except RegistryError as exc:
        report = ReloadReport(error=str(exc))
        logger.error("%s", report.summary())
        return report, None
    plan.swap_into(registry)
    return plan.report, plan.fingerprints
