"""Sampler names clients send -> what diffusers scheduler runs them.

Clients name samplers the AUTOMATIC1111 way (``"DPM++ 2M Karras"``, ``"Euler a"``) or the
ComfyUI way (``"dpmpp_2m"`` plus a separate ``scheduler`` field such as ``"karras"``). This
module turns either form into a :class:`SamplerChoice` (hashable, part of the engine's
batching key) and a choice into a :class:`SchedulerPlan` (diffusers class name and options);
``app.engine.schedulers.make_scheduler`` builds the scheduler itself.

Everything is driven by two tables of data:

* ``SAMPLERS``: one row per sampler: its names, the diffusers class and options that run it,
  A1111's default schedule for it, and whether diffusers is a faithful equivalent or only the
  closest one. The rows follow diffusers' scheduler overview (its table of A1111 names) and
  A1111 / k-diffusion behaviour. Each class, with what it can do with a schedule, is written
  once above the rows.
* ``SCHEDULES``: one row per schedule (the ComfyUI ``scheduler`` values): its A1111 name
  suffix and the diffusers option that produces it.

Nothing here imports torch or diffusers, so the name functions are cheap to call from the API
layer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any, NamedTuple

from app.errors import InvalidParameter, NotServed

__all__ = [
    "SamplerChoice",
    "SchedulerPlan",
    "a1111_sampler_names",
    "comfy_sampler_ids",
    "comfy_scheduler_names",
    "resolve_sampler",
    "sampler_table_markdown",
    "scheduler_plan",
]


@dataclass(frozen=True)
class SamplerChoice:
    """What a request's sampler (and optional scheduler field) resolved to.

    Equal choices build identical schedulers, so a choice can be part of a batching key.
    """

    sampler: str  # canonical name: the A1111 name, or the ComfyUI id where A1111 has none
    schedule: str  # one of SCHEDULES: normal, karras, exponential, sgm_uniform, ...
    label: str  # what ran, A1111 style, e.g. "DPM++ 2M Karras"
    exact: bool  # False: diffusers has no faithful equivalent; the closest one serves
    seeded_scheduler: bool  # True: the scheduler itself is seeded from the job's seed


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Schedule:
    name: str  # ComfyUI scheduler name (the request's `scheduler` field)
    suffix: str  # A1111-style suffix used in labels
    sigmas_option: str | None  # diffusers boolean option that switches the sigma schedule on
    spacing: str | None  # diffusers timestep_spacing that produces it
    faithful: bool  # whether diffusers' version is the same schedule as A1111/ComfyUI's
    note: str


SCHEDULES: tuple[_Schedule, ...] = (
    _Schedule(
        "normal",
        "Normal",
        None,
        None,
        True,
        "timesteps evenly spaced over the whole schedule (each sampler's own spacing: "
        "`linspace` for the k-diffusion samplers, `leading` for DDIM/PLMS)",
    ),
    _Schedule(
        "karras",
        "Karras",
        "use_karras_sigmas",
        "linspace",
        True,
        "Karras et al. (rho = 7) between the model's sigma_min and sigma_max",
    ),
    _Schedule(
        "exponential",
        "Exponential",
        "use_exponential_sigmas",
        "linspace",
        True,
        "sigmas evenly spaced in log(sigma) between sigma_max and sigma_min",
    ),
    _Schedule(
        "sgm_uniform",
        "SGM Uniform",
        None,
        "trailing",
        True,
        '`timestep_spacing="trailing"` (diffusers\' documented equivalent)',
    ),
    _Schedule(
        "simple",
        "Simple",
        None,
        "trailing",
        True,
        'every (1000/steps)-th training sigma from the top: `timestep_spacing="trailing"` '
        "(diffusers' documented equivalent)",
    ),
    _Schedule(
        "ddim_uniform",
        "DDIM Uniform",
        None,
        "leading",
        True,
        '`timestep_spacing="leading"` with `steps_offset=1` (timesteps 1, 1+k, 1+2k, ...)',
    ),
    _Schedule(
        "beta",
        "Beta",
        "use_beta_sigmas",
        "linspace",
        False,
        "diffusers' `use_beta_sigmas` (Beta(0.6, 0.6) quantiles, needs scipy) places sigmas "
        "linearly between sigma_min and sigma_max; A1111/ComfyUI pick the model's sigmas at "
        "the quantile timesteps instead, so this is the closest, not the same schedule",
    ),
)
_SCHEDULE_BY_NAME: dict[str, _Schedule] = {s.name: s for s in SCHEDULES}

# Schedule name suffixes accepted on A1111-style sampler names ("DPM++ 2M Karras").
# None = "Automatic": the sampler's own default. "Uniform" is A1111's name for the plain
# k-diffusion schedule, i.e. ComfyUI's "normal".
_NAME_SUFFIXES: dict[str, str | None] = {
    "sgm uniform": "sgm_uniform",
    "ddim uniform": "ddim_uniform",
    "exponential": "exponential",
    "automatic": None,
    "karras": "karras",
    "uniform": "normal",
    "normal": "normal",
    "simple": "simple",
    "beta": "beta",
}

# Extra spellings accepted in the `scheduler` field (A1111's API names its schedulers too).
_FIELD_ALIASES: dict[str, str | None] = {
    "": None,
    "automatic": None,
    "auto": None,
    "uniform": "normal",
    "ddim": "ddim_uniform",
    "sgm": "sgm_uniform",
}

# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SchedulerClass:
    """A diffusers scheduler class (by name: diffusers is not imported here) and what it can do
    with a schedule; verified against the __init__ signatures and set_timesteps of diffusers
    0.42 by tests/test_samplers.py."""

    name: str
    takes_sigmas: bool  # takes use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas
    honours_spacing: bool  # set_timesteps follows timestep_spacing
    seed_option: str | None = None  # constructor argument seeding the scheduler's own noise


_EULER = _SchedulerClass("EulerDiscreteScheduler", True, True)
_EULER_ANCESTRAL = _SchedulerClass("EulerAncestralDiscreteScheduler", False, True)
_LMS = _SchedulerClass("LMSDiscreteScheduler", True, True)
_HEUN = _SchedulerClass("HeunDiscreteScheduler", True, True)
_KDPM2 = _SchedulerClass("KDPM2DiscreteScheduler", True, True)
_KDPM2_ANCESTRAL = _SchedulerClass("KDPM2AncestralDiscreteScheduler", True, True)
_DPM_MULTISTEP = _SchedulerClass("DPMSolverMultistepScheduler", True, True)
_DPM_SINGLESTEP = _SchedulerClass("DPMSolverSinglestepScheduler", True, False)
_DPM_SDE = _SchedulerClass("DPMSolverSDEScheduler", True, True, seed_option="noise_sampler_seed")
_DDIM = _SchedulerClass("DDIMScheduler", False, True)
_PNDM = _SchedulerClass("PNDMScheduler", False, True)
_UNIPC = _SchedulerClass("UniPCMultistepScheduler", True, True)
_LCM = _SchedulerClass("LCMScheduler", False, False)
_DEIS = _SchedulerClass("DEISMultistepScheduler", True, True)


@dataclass(frozen=True)
class _Sampler:
    name: str  # canonical name (A1111 name; ComfyUI id where A1111 has none)
    comfy: tuple[str, ...]  # ComfyUI ids that mean this sampler
    cls: _SchedulerClass  # the diffusers scheduler class that runs it
    options: Mapping[str, Any]  # fixed diffusers options (immutable values only)
    default: str = "normal"  # A1111 (>= 1.9) schedule when neither suffix nor field is given
    exact: bool = True  # diffusers runs the same algorithm
    spacing: str = "linspace"  # timestep_spacing of the plain ("normal") schedule
    a1111: bool = True  # `name` is an A1111 sampler name (takes schedule suffixes)
    aliases: tuple[str, ...] = ()  # further A1111-style names (A1111's own aliases)
    note: str = ""

    @property
    def seeded(self) -> bool:
        """Whether the scheduler is seeded from the job seed (its class holds its own noise)."""
        return self.cls.seed_option is not None


def _opts(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


# DPM-Solver++ multistep as k-diffusion's sample_dpmpp_2m*: first order on the final step to
# sigma 0 (final_sigmas_type="zero" forces that), lower order near the end below 15 steps.
_DPM_MULTI = dict(
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    final_sigmas_type="zero",
    use_lu_lambdas=False,
)

# Third-order single-step DPM-Solver++: the closest diffusers has to k-diffusion's DPM fast and
# DPM adaptive (both serve it).
_DPM_SINGLESTEP_3 = _opts(
    solver_order=3,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero",
)

SAMPLERS: tuple[_Sampler, ...] = (
    _Sampler(
        "Euler",
        ("euler",),
        _EULER,
        _opts(interpolation_type="linear", final_sigmas_type="zero"),
        aliases=("k_euler",),
    ),
    _Sampler(
        "Euler a",
        ("euler_ancestral",),
        _EULER_ANCESTRAL,
        _opts(),
        aliases=("k_euler_a", "k_euler_ancestral"),
    ),
    _Sampler("LMS", ("lms",), _LMS, _opts(), aliases=("k_lms",)),
    _Sampler("Heun", ("heun",), _HEUN, _opts(), aliases=("k_heun",)),
    _Sampler(
        "DPM2",
        ("dpm_2",),
        _KDPM2,
        _opts(),
        default="karras",
        aliases=("k_dpm_2",),
        note="A1111 also drops the next-to-last sigma",
    ),
    _Sampler(
        "DPM2 a",
        ("dpm_2_ancestral",),
        _KDPM2_ANCESTRAL,
        _opts(),
        default="karras",
        aliases=("k_dpm_2_a",),
        note="A1111 also drops the next-to-last sigma",
    ),
    _Sampler(
        "DPM++ 2S a",
        ("dpmpp_2s_ancestral",),
        _DPM_SINGLESTEP,
        _opts(
            solver_order=2,
            algorithm_type="sde-dpmsolver++",
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
        ),
        default="karras",
        exact=False,
        aliases=("k_dpmpp_2s_a",),
        note="no DPM++ 2S ancestral in diffusers; stochastic 1-step DPM-Solver++(2) is closest",
    ),
    _Sampler(
        "DPM++ 2M",
        ("dpmpp_2m",),
        _DPM_MULTISTEP,
        _opts(**_DPM_MULTI, algorithm_type="dpmsolver++"),
        default="karras",
        aliases=("k_dpmpp_2m",),
    ),
    _Sampler(
        "DPM++ SDE",
        ("dpmpp_sde", "dpmpp_sde_gpu"),
        _DPM_SDE,
        _opts(),
        default="karras",
        aliases=("k_dpmpp_sde",),
        note="k-diffusion's Brownian-tree sampler (needs torchsde); the tree is seeded from the "
        "job seed via `noise_sampler_seed`",
    ),
    _Sampler(
        "DPM++ 2M SDE",
        ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
        _DPM_MULTISTEP,
        _opts(**_DPM_MULTI, algorithm_type="sde-dpmsolver++"),
        default="exponential",
        aliases=("k_dpmpp_2m_sde",),
        note="step noise drawn from the job's generator rather than a Brownian tree",
    ),
    _Sampler(
        "DPM++ 2M SDE Heun",
        ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
        _DPM_MULTISTEP,
        _opts(**{**_DPM_MULTI, "solver_type": "heun"}, algorithm_type="sde-dpmsolver++"),
        default="exponential",
        aliases=("k_dpmpp_2m_sde_heun",),
        note="same update as k-diffusion's solver_type='heun'; step noise from the generator",
    ),
    _Sampler(
        "DPM++ 3M SDE",
        ("dpmpp_3m_sde", "dpmpp_3m_sde_gpu"),
        _DPM_MULTISTEP,
        _opts(**{**_DPM_MULTI, "solver_order": 3}, algorithm_type="sde-dpmsolver++"),
        default="exponential",
        exact=False,
        aliases=("k_dpmpp_3m_sde",),
        note="third-order SDE DPM-Solver++ is the closest; A1111 also drops the next-to-last sigma",
    ),
    _Sampler(
        "DPM fast",
        ("dpm_fast",),
        _DPM_SINGLESTEP,
        _DPM_SINGLESTEP_3,
        exact=False,
        aliases=("k_dpm_fast",),
        note="k-diffusion's DPM-Solver-fast has no diffusers port; single-step DPM-Solver++(3) "
        "is the closest",
    ),
    _Sampler(
        "DPM adaptive",
        ("dpm_adaptive",),
        _DPM_SINGLESTEP,
        _DPM_SINGLESTEP_3,
        exact=False,
        aliases=("k_dpm_ad",),
        note="no adaptive step-size solver in diffusers; runs exactly `steps` steps of "
        "single-step DPM-Solver++(3)",
    ),
    _Sampler(
        "Restart",
        (),
        _HEUN,
        _opts(),
        default="karras",
        exact=False,
        aliases=("restart",),
        note="no Restart sampler in diffusers; Heun (its inner solver) without the restarts",
    ),
    _Sampler(
        "DDIM",
        ("ddim",),
        _DDIM,
        _opts(set_alpha_to_one=False, clip_sample=False),
        spacing="leading",
        note="eta from the request (0 = deterministic)",
    ),
    _Sampler(
        "PLMS",
        (),
        _PNDM,
        _opts(skip_prk_steps=True, set_alpha_to_one=False),
        spacing="leading",
        aliases=("plms",),
    ),
    _Sampler(
        "UniPC",
        ("uni_pc",),
        _UNIPC,
        _opts(
            solver_order=3,
            solver_type="bh1",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="sigma_min",
        ),
        aliases=("unipc",),
        note="A1111/ComfyUI defaults: variant bh1, order 3; ends at sigma_min as A1111's UniPC "
        "does (diffusers' bh1 cannot step to sigma 0)",
    ),
    _Sampler(
        "LCM",
        ("lcm",),
        _LCM,
        _opts(),
        aliases=("k_lcm",),
        note="needs an LCM model or LCM-LoRA for good images (few steps, low CFG)",
    ),
    # ComfyUI-only samplers: canonical name is the ComfyUI id.
    _Sampler(
        "heunpp2",
        ("heunpp2",),
        _HEUN,
        _opts(),
        exact=False,
        a1111=False,
        note="no Heun++ in diffusers; plain Heun is the closest",
    ),
    _Sampler(
        "uni_pc_bh2",
        ("uni_pc_bh2",),
        _UNIPC,
        _opts(
            solver_order=3,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="sigma_min",
        ),
        a1111=False,
    ),
    _Sampler(
        "deis",
        ("deis",),
        _DEIS,
        _opts(solver_order=3, algorithm_type="deis", lower_order_final=True),
        exact=False,
        a1111=False,
        note="diffusers' DEIS (log-rho) rather than ComfyUI's tabulated DEIS; order 3 as ComfyUI",
    ),
)
_SAMPLER_BY_NAME: dict[str, _Sampler] = {s.name: s for s in SAMPLERS}

# The listings (GET /sd/samplers, /samplers-xl) follow docs/api-contracts.md. The table's rows
# are in A1111's order, so the A1111 names are read from it.
_A1111_BASE: tuple[str, ...] = tuple(entry.name for entry in SAMPLERS if entry.a1111)
# A1111's legacy names with the schedule in them (before 1.9), listed after the base names.
_A1111_LEGACY: tuple[str, ...] = (
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE Karras",
    "DPM++ 2M SDE Exponential",
    "DPM++ 2S a Karras",
    "DPM++ 3M SDE Karras",
    "DPM++ 3M SDE Exponential",
    "LMS Karras",
    "DPM2 Karras",
    "DPM2 a Karras",
    "Euler Karras",
)


def _comfy_listing(ids: tuple[str, ...]) -> tuple[str, ...]:
    """`ids`, once each checked to be ComfyUI ids of the table."""
    unknown = sorted(set(ids) - {comfy_id for entry in SAMPLERS for comfy_id in entry.comfy})
    if unknown or len(set(ids)) != len(ids):
        raise RuntimeError(f"the ComfyUI listing has ids the sampler table lacks, or twice: {unknown}")
    return ids


# ComfyUI lists its ids in its own order, not A1111's (lms after dpm_2_ancestral, dpmpp_sde before
# dpmpp_2m), and the table cannot follow both, so this order is written here; what each id runs
# is the table's. The table also accepts a few ids the listing leaves out.
_COMFY_IDS: tuple[str, ...] = _comfy_listing(
    (
        "euler",
        "euler_ancestral",
        "heun",
        "heunpp2",
        "dpm_2",
        "dpm_2_ancestral",
        "lms",
        "dpm_fast",
        "dpm_adaptive",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_sde_gpu",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_gpu",
        "dpmpp_3m_sde",
        "dpmpp_3m_sde_gpu",
        "ddim",
        "uni_pc",
        "uni_pc_bh2",
        "lcm",
        "deis",
    )
)

_A1111_STYLE = "a1111"
_COMFY_STYLE = "comfy"


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _build_index() -> dict[str, tuple[_Sampler, str]]:
    index: dict[str, tuple[_Sampler, str]] = {}

    def add(key: str, entry: _Sampler, style: str) -> None:
        key = _norm(key)
        if key in index:
            other, other_style = index[key]
            default = entry.default if style == _A1111_STYLE else "normal"
            other_default = other.default if other_style == _A1111_STYLE else "normal"
            if other is not entry or default != other_default:
                raise RuntimeError(f"sampler name {key!r} is ambiguous in the sampler table")
            return
        index[key] = (entry, style)

    for entry in SAMPLERS:
        if entry.a1111:
            add(entry.name, entry, _A1111_STYLE)
        for alias in entry.aliases:
            add(alias, entry, _A1111_STYLE)
        for comfy_id in entry.comfy:
            add(comfy_id, entry, _COMFY_STYLE)
    return index


_INDEX = _build_index()


# --------------------------------------------------------------------------------------
# Public: names
# --------------------------------------------------------------------------------------


def a1111_sampler_names() -> list[str]:
    """A1111-style names for GET /sd/samplers: the base names, then the legacy suffixed ones."""
    return list(_A1111_BASE) + list(_A1111_LEGACY)


def comfy_sampler_ids() -> list[str]:
    """ComfyUI sampler ids (for /samplers-xl)."""
    return list(_COMFY_IDS)


def comfy_scheduler_names() -> list[str]:
    """The values the request's `scheduler` field accepts."""
    return [s.name for s in SCHEDULES]


# --------------------------------------------------------------------------------------
# Public: resolution
# --------------------------------------------------------------------------------------


def _lookup(name: str) -> tuple[_Sampler, str, str | None, bool]:
    """(entry, style, schedule from a name suffix, whether the name carried a suffix)."""
    key = _norm(name)
    hit = _INDEX.get(key)
    if hit is not None:
        return hit[0], hit[1], None, False
    for suffix, schedule in _NAME_SUFFIXES.items():
        if key.endswith(" " + suffix):
            hit = _INDEX.get(key[: -len(suffix) - 1])
            if hit is not None and hit[1] == _A1111_STYLE:
                return hit[0], hit[1], schedule, schedule is not None
    shown = " ".join(name.split()) if isinstance(name, str) else str(name)
    raise NotServed("sampler", shown, a1111_sampler_names() + comfy_sampler_ids())


def _field_schedule(scheduler: str | None) -> str | None:
    if scheduler is None:
        return None
    if not isinstance(scheduler, str):
        raise InvalidParameter("scheduler", scheduler, "must be a string")
    key = _norm(scheduler)
    if key in _FIELD_ALIASES:
        return _FIELD_ALIASES[key]
    key = key.replace(" ", "_").replace("-", "_")
    if key in _SCHEDULE_BY_NAME:
        return key
    raise NotServed("scheduler", " ".join(scheduler.split()), comfy_scheduler_names())


def _supports(entry: _Sampler, schedule: _Schedule) -> bool:
    """Whether entry's class produces `schedule` (else its plain schedule serves)."""
    if schedule.sigmas_option is not None:
        if schedule.name == "beta" and importlib.util.find_spec("scipy") is None:
            return False
        return entry.cls.takes_sigmas
    if schedule.spacing is not None:
        return entry.cls.honours_spacing
    return True


def _label(entry: _Sampler, schedule: str) -> str:
    if schedule == "normal" and entry.default == "normal":
        return entry.name
    return f"{entry.name} {_SCHEDULE_BY_NAME[schedule].suffix}"


@cache
def _choice(sampler: str, schedule: str) -> SamplerChoice:
    entry = _SAMPLER_BY_NAME[sampler]
    spec = _SCHEDULE_BY_NAME[schedule]
    supported = _supports(entry, spec)
    return SamplerChoice(
        sampler=entry.name,
        schedule=schedule,
        label=_label(entry, schedule if supported else "normal"),  # what actually runs
        exact=entry.exact and spec.faithful and supported,
        seeded_scheduler=entry.seeded,
    )


def resolve_sampler(name: str, scheduler: str | None = None) -> SamplerChoice:
    """Resolve a client's sampler name and optional `scheduler` field.

    Names are matched case-insensitively, ignoring surrounding and repeated spaces. A1111
    names may carry a schedule suffix ("DPM++ 2M Karras"); a suffix and a `scheduler` field
    that disagree raise InvalidParameter. With neither, A1111 names get A1111's default
    schedule for that sampler and ComfyUI ids get "normal" (ComfyUI's default).
    """
    if not isinstance(name, str):
        raise NotServed("sampler", str(name), a1111_sampler_names() + comfy_sampler_ids())
    entry, style, from_suffix, has_suffix = _lookup(name)
    from_field = _field_schedule(scheduler)
    if has_suffix and from_field is not None and from_field != from_suffix:
        raise InvalidParameter(
            "scheduler",
            scheduler,
            f"the sampler name {' '.join(name.split())!r} already selects the "
            f"{from_suffix!r} schedule; send the sampler without the suffix, or a matching "
            f"scheduler",
        )
    schedule = from_suffix or from_field
    if schedule is None:
        schedule = entry.default if style == _A1111_STYLE else "normal"
    return _choice(entry.name, schedule)


# --------------------------------------------------------------------------------------
# Public: what runs a choice
# --------------------------------------------------------------------------------------


class SchedulerPlan(NamedTuple):
    """What runs a choice: the diffusers class (by name) and the options it is built with."""

    cls_name: str
    options: Mapping[str, Any]  # table options; the model's config supplies everything else
    seed_option: str | None  # constructor argument that takes the job seed, for seeded samplers


def scheduler_plan(choice: SamplerChoice) -> SchedulerPlan:
    """The diffusers class and options that run `choice` (app.engine.schedulers builds them)."""
    try:
        return _plan(choice.sampler, choice.schedule)
    except KeyError:
        raise ValueError(f"unknown sampler choice {choice!r}") from None


@cache
def _plan(sampler: str, schedule: str) -> SchedulerPlan:
    entry = _SAMPLER_BY_NAME[sampler]
    spec = _SCHEDULE_BY_NAME[schedule]
    options = dict(entry.options)
    if entry.cls.takes_sigmas:  # override whatever the model's own config says
        for other in SCHEDULES:
            if other.sigmas_option is not None:
                options[other.sigmas_option] = False
    spacing = entry.spacing
    if _supports(entry, spec):
        if spec.sigmas_option is not None:
            options[spec.sigmas_option] = True
            spacing = spec.spacing  # linspace, so sigma_min..sigma_max spans the schedule
        elif spec.spacing is not None:
            spacing = spec.spacing
    if entry.cls.honours_spacing:
        options["timestep_spacing"] = spacing
        if spacing == "leading":
            options["steps_offset"] = 1
    return SchedulerPlan(entry.cls.name, MappingProxyType(options), entry.cls.seed_option)


# --------------------------------------------------------------------------------------
# Public: documentation
# --------------------------------------------------------------------------------------


def _fmt_options(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def sampler_table_markdown() -> str:
    """The README/docs tables: every accepted name, what runs, exact or closest."""
    lines = [
        "| Sampler (A1111 name) | ComfyUI id | Other accepted names | Default schedule "
        "(A1111 name / ComfyUI id) | diffusers scheduler and options | Fidelity | Notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in SAMPLERS:
        a1111 = f"`{entry.name}`" if entry.a1111 else "—"
        comfy = ", ".join(f"`{c}`" for c in entry.comfy) or "—"
        aliases = ", ".join(f"`{a}`" for a in entry.aliases) or "—"
        default = f"{entry.default} / normal" if entry.a1111 else "normal"
        cls_name, options, seed_option = _plan(entry.name, "normal")
        runs = f"`{cls_name}`"
        fixed = {k: v for k, v in options.items() if not k.startswith("use_")}
        if fixed:
            runs += f" ({_fmt_options(fixed)})"
        if seed_option is not None:
            runs += f", {seed_option}=job seed"
        fidelity = "exact" if entry.exact else "closest"
        notes = [entry.note] if entry.note else []
        missing = [s.name for s in SCHEDULES if not _supports(entry, s)]
        if missing:
            cannot = ", ".join(missing)
            notes.append(f"`{cls_name}` cannot do {cannot}: its normal schedule serves (closest)")
        note = "; ".join(notes)
        cells = (a1111, comfy, aliases, default, runs, fidelity, note)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| Schedule (`scheduler` field) | A1111 suffix | diffusers option | Fidelity | Notes |",
        "|---|---|---|---|---|",
    ]
    for spec in SCHEDULES:
        if spec.sigmas_option is not None:
            option = f'`{spec.sigmas_option}=True`, `timestep_spacing="linspace"`'
        elif spec.spacing is not None:
            option = f'`timestep_spacing="{spec.spacing}"`'
        else:
            option = "none (plain)"
        suffix = f"`{spec.suffix}`" + (" or `Uniform`" if spec.name == "normal" else "")
        fidelity = "exact" if spec.faithful else "closest"
        lines.append(f"| `{spec.name}` | {suffix} | {option} | {fidelity} | {spec.note} |")
    return "\n".join(lines) + "\n"
