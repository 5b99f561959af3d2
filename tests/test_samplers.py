"""Sampler names -> diffusers schedulers (app.samplers)."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from app import samplers as S
from app.engine import schedulers
from app.engine.schedulers import make_scheduler
from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl
from app.errors import InvalidParameter, NotServed
from app.samplers import (
    SamplerChoice,
    a1111_sampler_names,
    comfy_sampler_ids,
    comfy_scheduler_names,
    resolve_sampler,
    sampler_table_markdown,
    scheduler_plan,
)

# torchsde's Brownian interval warns about float rounding at the end of the schedule
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
SDXL_CONFIG = json.loads(
    (ROOT / "app" / "configs" / "sdxl" / "scheduler" / "scheduler_config.json").read_text()
)

# --- the names in shared/api/samplers.md -----------------------------------------------

A1111_NAMES = [
    "Euler",
    "Euler a",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "DDIM",
    "PLMS",
    "UniPC",
    "LCM",
]
A1111_SUFFIXED = [
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
]
COMFY_IDS = [
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
]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]
SUFFIXES = {
    "Karras": "karras",
    "Exponential": "exponential",
    "SGM Uniform": "sgm_uniform",
    "Beta": "beta",
}

# name -> (canonical sampler, schedule, diffusers class, exact)
EXPECTED = {
    "Euler": ("Euler", "normal", "EulerDiscreteScheduler", True),
    "Euler a": ("Euler a", "normal", "EulerAncestralDiscreteScheduler", True),
    "LMS": ("LMS", "normal", "LMSDiscreteScheduler", True),
    "Heun": ("Heun", "normal", "HeunDiscreteScheduler", True),
    "DPM2": ("DPM2", "karras", "KDPM2DiscreteScheduler", True),
    "DPM2 a": ("DPM2 a", "karras", "KDPM2AncestralDiscreteScheduler", True),
    "DPM++ 2S a": ("DPM++ 2S a", "karras", "DPMSolverSinglestepScheduler", False),
    "DPM++ 2M": ("DPM++ 2M", "karras", "DPMSolverMultistepScheduler", True),
    "DPM++ SDE": ("DPM++ SDE", "karras", "DPMSolverSDEScheduler", True),
    "DPM++ 2M SDE": ("DPM++ 2M SDE", "exponential", "DPMSolverMultistepScheduler", True),
    "DPM++ 2M SDE Heun": (
        "DPM++ 2M SDE Heun",
        "exponential",
        "DPMSolverMultistepScheduler",
        True,
    ),
    "DPM++ 3M SDE": ("DPM++ 3M SDE", "exponential", "DPMSolverMultistepScheduler", False),
    "DPM fast": ("DPM fast", "normal", "DPMSolverSinglestepScheduler", False),
    "DPM adaptive": ("DPM adaptive", "normal", "DPMSolverSinglestepScheduler", False),
    "Restart": ("Restart", "karras", "HeunDiscreteScheduler", False),
    "DDIM": ("DDIM", "normal", "DDIMScheduler", True),
    "PLMS": ("PLMS", "normal", "PNDMScheduler", True),
    "UniPC": ("UniPC", "normal", "UniPCMultistepScheduler", True),
    "LCM": ("LCM", "normal", "LCMScheduler", True),
    "DPM++ 2M Karras": ("DPM++ 2M", "karras", "DPMSolverMultistepScheduler", True),
    "DPM++ SDE Karras": ("DPM++ SDE", "karras", "DPMSolverSDEScheduler", True),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "karras", "DPMSolverMultistepScheduler", True),
    "DPM++ 2M SDE Exponential": (
        "DPM++ 2M SDE",
        "exponential",
        "DPMSolverMultistepScheduler",
        True,
    ),
    "DPM++ 2S a Karras": ("DPM++ 2S a", "karras", "DPMSolverSinglestepScheduler", False),
    "DPM++ 3M SDE Karras": ("DPM++ 3M SDE", "karras", "DPMSolverMultistepScheduler", False),
    "DPM++ 3M SDE Exponential": (
        "DPM++ 3M SDE",
        "exponential",
        "DPMSolverMultistepScheduler",
        False,
    ),
    "LMS Karras": ("LMS", "karras", "LMSDiscreteScheduler", True),
    "DPM2 Karras": ("DPM2", "karras", "KDPM2DiscreteScheduler", True),
    "DPM2 a Karras": ("DPM2 a", "karras", "KDPM2AncestralDiscreteScheduler", True),
    "Euler Karras": ("Euler", "karras", "EulerDiscreteScheduler", True),
    # ComfyUI ids: schedule "normal" unless the scheduler field says otherwise
    "euler": ("Euler", "normal", "EulerDiscreteScheduler", True),
    "euler_ancestral": ("Euler a", "normal", "EulerAncestralDiscreteScheduler", True),
    "heun": ("Heun", "normal", "HeunDiscreteScheduler", True),
    "heunpp2": ("heunpp2", "normal", "HeunDiscreteScheduler", False),
    "dpm_2": ("DPM2", "normal", "KDPM2DiscreteScheduler", True),
    "dpm_2_ancestral": ("DPM2 a", "normal", "KDPM2AncestralDiscreteScheduler", True),
    "lms": ("LMS", "normal", "LMSDiscreteScheduler", True),
    "dpm_fast": ("DPM fast", "normal", "DPMSolverSinglestepScheduler", False),
    "dpm_adaptive": ("DPM adaptive", "normal", "DPMSolverSinglestepScheduler", False),
    "dpmpp_2s_ancestral": ("DPM++ 2S a", "normal", "DPMSolverSinglestepScheduler", False),
    "dpmpp_sde": ("DPM++ SDE", "normal", "DPMSolverSDEScheduler", True),
    "dpmpp_sde_gpu": ("DPM++ SDE", "normal", "DPMSolverSDEScheduler", True),
    "dpmpp_2m": ("DPM++ 2M", "normal", "DPMSolverMultistepScheduler", True),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", "normal", "DPMSolverMultistepScheduler", True),
    "dpmpp_2m_sde_gpu": ("DPM++ 2M SDE", "normal", "DPMSolverMultistepScheduler", True),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", "normal", "DPMSolverMultistepScheduler", False),
    "dpmpp_3m_sde_gpu": ("DPM++ 3M SDE", "normal", "DPMSolverMultistepScheduler", False),
    "ddim": ("DDIM", "normal", "DDIMScheduler", True),
    "uni_pc": ("UniPC", "normal", "UniPCMultistepScheduler", True),
    "uni_pc_bh2": ("uni_pc_bh2", "normal", "UniPCMultistepScheduler", True),
    "lcm": ("LCM", "normal", "LCMScheduler", True),
    "deis": ("deis", "normal", "DEISMultistepScheduler", False),
}
ALL_NAMES = A1111_NAMES + A1111_SUFFIXED + COMFY_IDS
STOCHASTIC = [
    "Euler a",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "dpmpp_sde_gpu",
]


def _spellings(name: str) -> list[str]:
    return [
        name,
        name.upper(),
        name.lower(),
        name.swapcase(),
        f"  {name}\t ",
        name.replace(" ", "   "),
        f" {name.title()}  ",
    ]


def _choice_id(choice: SamplerChoice) -> str:
    return f"{choice.sampler}-{choice.schedule}"


def _entry_choice(entry, scheduler: str | None = None) -> SamplerChoice:
    return resolve_sampler(entry.name if entry.a1111 else entry.comfy[0], scheduler)


def _all_choices() -> list[SamplerChoice]:
    return [_entry_choice(e, s) for e in S.SAMPLERS for s in SCHEDULERS]


# --- names ----------------------------------------------------------------------------


def test_expected_covers_every_listed_name():
    assert sorted(EXPECTED) == sorted(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_listed_name_resolves_to_its_table_entry(name):
    sampler, schedule, cls_name, exact = EXPECTED[name]
    for spelling in _spellings(name):
        choice = resolve_sampler(spelling)
        assert choice.sampler == sampler, spelling
        assert choice.schedule == schedule, spelling
        assert choice.exact is exact, spelling
        assert choice.seeded_scheduler is (sampler == "DPM++ SDE")
    assert type(make_scheduler(choice, SDXL_CONFIG, seed=1)).__name__ == cls_name


@pytest.mark.parametrize("name", A1111_NAMES)
@pytest.mark.parametrize("suffix", [*SUFFIXES, "Uniform", "Automatic"])
def test_a1111_names_take_every_schedule_suffix(name, suffix):
    base = resolve_sampler(name)
    for spelling in _spellings(f"{name} {suffix}"):
        choice = resolve_sampler(spelling)
        assert choice.sampler == base.sampler
        if suffix == "Automatic":
            assert choice == base
        elif suffix == "Uniform":
            assert choice.schedule == "normal"
        else:
            assert choice.schedule == SUFFIXES[suffix]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_scheduler_field_picks_the_schedule(name, scheduler):
    sampler, from_suffix = EXPECTED[name][:2]
    for spelling in (scheduler, scheduler.upper(), f" {scheduler.title()} "):
        if name not in A1111_SUFFIXED:
            choice = resolve_sampler(name, spelling)
            assert choice.sampler == sampler
            assert choice.schedule == scheduler
        elif scheduler == from_suffix:  # the field agrees with the name's suffix
            assert resolve_sampler(name, spelling) == resolve_sampler(name)
        else:  # it contradicts it: a 422 naming both
            with pytest.raises(InvalidParameter) as err:
                resolve_sampler(name, spelling)
            assert err.value.field == "scheduler"
            assert repr(spelling) in err.value.message
            assert repr(name) in err.value.message and repr(from_suffix) in err.value.message


def test_scheduler_field_accepts_a1111_spellings():
    assert resolve_sampler("Euler", "SGM Uniform").schedule == "sgm_uniform"
    assert resolve_sampler("Euler", "Uniform").schedule == "normal"
    assert resolve_sampler("DPM++ 2M", "Automatic") == resolve_sampler("DPM++ 2M")
    assert resolve_sampler("DPM++ 2M", "") == resolve_sampler("DPM++ 2M")
    assert resolve_sampler("DPM++ 2M", None) == resolve_sampler("DPM++ 2M")


def test_equivalent_spellings_are_equal_choices():
    assert resolve_sampler("DPM++ 2M Karras") == resolve_sampler("dpmpp_2m", "karras")
    assert resolve_sampler("DPM++ 2M") == resolve_sampler("dpmpp_2m", "karras")
    assert resolve_sampler("Euler") == resolve_sampler("euler", "normal")
    assert resolve_sampler("Euler") == resolve_sampler("euler")
    assert resolve_sampler("DPM++ 2M SDE") == resolve_sampler("dpmpp_2m_sde", "exponential")
    assert resolve_sampler("dpmpp_sde_gpu", "karras") == resolve_sampler("DPM++ SDE Karras")
    assert resolve_sampler("UniPC") == resolve_sampler("uni_pc")
    assert hash(resolve_sampler("DPM++ 2M Karras")) == hash(resolve_sampler("dpmpp_2m", "karras"))
    # ComfyUI's default schedule is normal, A1111's for DPM++ 2M is Karras
    assert resolve_sampler("dpmpp_2m") != resolve_sampler("DPM++ 2M")


def test_labels():
    assert resolve_sampler("dpmpp_2m", "karras").label == "DPM++ 2M Karras"
    assert resolve_sampler("DPM++ 2M").label == "DPM++ 2M Karras"
    assert resolve_sampler("Euler").label == "Euler"
    assert resolve_sampler("euler", "sgm_uniform").label == "Euler SGM Uniform"
    assert resolve_sampler("DPM++ 2M SDE").label == "DPM++ 2M SDE Exponential"
    assert resolve_sampler("dpmpp_2m").label == "DPM++ 2M Normal"
    assert resolve_sampler("deis", "karras").label == "deis Karras"
    assert resolve_sampler("Euler a Karras").label == "Euler a"  # no Karras in Euler a: plain ran
    assert resolve_sampler("Euler a Karras").schedule == "karras"  # what was asked


def test_unsupported_or_unfaithful_schedules_are_not_exact():
    assert resolve_sampler("Euler a Karras").exact is False  # no karras in EulerAncestral
    assert resolve_sampler("DDIM", "exponential").exact is False
    assert resolve_sampler("LCM", "sgm_uniform").exact is False  # LCM ignores spacing
    assert resolve_sampler("DPM++ 2M", "beta").exact is False  # diffusers' beta differs
    assert resolve_sampler("Euler", "sgm_uniform").exact is True
    assert resolve_sampler("Euler a", "sgm_uniform").exact is True


def test_contradicting_suffix_and_field():
    with pytest.raises(InvalidParameter) as err:
        resolve_sampler("DPM++ 2M Karras", "exponential")
    assert err.value.field == "scheduler"
    assert "DPM++ 2M Karras" in err.value.message
    assert "exponential" in err.value.message
    assert err.value.status == 422
    with pytest.raises(InvalidParameter):
        resolve_sampler("Euler Uniform", "karras")
    with pytest.raises(InvalidParameter):
        resolve_sampler("dpm++ 2m sde  exponential", "SGM_uniform")


def test_agreeing_suffix_and_field():
    assert resolve_sampler("DPM++ 2M Karras", "karras") == resolve_sampler("DPM++ 2M Karras")
    assert resolve_sampler("DPM++ 2M Karras", " KARRAS ").schedule == "karras"
    assert resolve_sampler("Euler Uniform", "normal").schedule == "normal"
    assert resolve_sampler("DPM++ 2M Automatic", "exponential").schedule == "exponential"


def test_unknown_sampler_suggests_close_matches():
    with pytest.raises(NotServed) as err:
        resolve_sampler("DPM++ 2M Karas")
    assert err.value.field == "sampler"
    assert "doesn't have sampler 'DPM++ 2M Karas'" in err.value.message
    assert "DPM++ 2M Karras" in err.value.suggestions
    with pytest.raises(NotServed) as err:
        resolve_sampler("eulr_ancestral")
    assert "euler_ancestral" in err.value.suggestions
    for bad in ("", "   ", "Euler Karras Karras", "dpmpp_2m karras", "Euler b"):
        with pytest.raises(NotServed):
            resolve_sampler(bad)


def test_unknown_scheduler_is_not_served():
    with pytest.raises(NotServed) as err:
        resolve_sampler("Euler", "karas")
    assert err.value.field == "scheduler"
    assert "doesn't have scheduler 'karas'" in err.value.message
    assert "karras" in err.value.suggestions
    with pytest.raises(NotServed):
        resolve_sampler("Euler", "polyexponential")


def test_names_need_neither_torch_nor_diffusers():
    code = (
        "import sys, app.samplers as s; s.resolve_sampler('DPM++ 2M Karras'); s.sampler_table_markdown(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_listing_functions():
    assert a1111_sampler_names()[: len(A1111_NAMES)] == A1111_NAMES
    assert set(A1111_SUFFIXED) <= set(a1111_sampler_names())
    assert comfy_sampler_ids() == COMFY_IDS
    assert comfy_scheduler_names() == SCHEDULERS
    for name in a1111_sampler_names() + comfy_sampler_ids():
        resolve_sampler(name)
    a1111_sampler_names().append("x")  # callers get copies
    assert "x" not in a1111_sampler_names()


# --- schedulers -----------------------------------------------------------------------


def test_table_matches_diffusers_signatures():
    for entry in S.SAMPLERS:
        cls = getattr(diffusers, entry.cls.name)
        params = set(inspect.signature(cls.__init__).parameters)
        sigma_opts = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"}
        assert entry.cls.takes_sigmas == (sigma_opts <= params), entry.cls
        if entry.cls.honours_spacing:
            assert "timestep_spacing" in params
            source = inspect.getsource(cls.set_timesteps)
            assert "self.config.timestep_spacing" in source, entry.cls
        for schedule in SCHEDULERS:
            plan = scheduler_plan(_entry_choice(entry, schedule))
            assert plan.cls_name == entry.cls.name
            assert set(plan.options) <= params, (entry.name, schedule, set(plan.options) - params)
            assert (plan.seed_option is not None) is entry.seeded
            assert plan.seed_option is None or plan.seed_option in params


@pytest.mark.parametrize("choice", _all_choices(), ids=_choice_id)
def test_every_choice_builds_a_sane_schedule(choice):
    sched = make_scheduler(choice, SDXL_CONFIG, seed=5)
    for key, value in scheduler_plan(choice).options.items():
        assert sched.config[key] == value, key
    for steps in (2, 4, 7, 30):  # 1 step: see test_one_step_needs_trailing_spacing
        sched.set_timesteps(steps)
        timesteps = sched.timesteps.double().numpy()
        assert np.isfinite(timesteps).all()
        assert (timesteps >= 0).all() and (timesteps <= 999.5).all()
        # (KDPM2 interleaves its interpolated timesteps, which may sit a fraction above)
        assert (np.diff(timesteps) <= 1.0).all()
        sigmas = getattr(sched, "sigmas", None)
        if sigmas is not None:
            sigmas = sigmas.double().numpy()
            assert np.isfinite(sigmas).all()
            assert (np.diff(sigmas) <= 1e-4).all()
            assert sigmas[-1] < 0.03  # ends denoised (0, or sigma_min)


def test_schedule_options_reach_the_scheduler():
    def cfg(name, scheduler=None):
        return make_scheduler(resolve_sampler(name, scheduler), SDXL_CONFIG).config

    assert cfg("Euler").timestep_spacing == "linspace"  # not SDXL's "leading"
    assert cfg("Euler").use_karras_sigmas is False
    assert cfg("DDIM").timestep_spacing == "leading"
    assert cfg("DPM++ 2M").use_karras_sigmas is True
    assert cfg("DPM++ 2M SDE").use_exponential_sigmas is True
    assert cfg("DPM++ 2M SDE").algorithm_type == "sde-dpmsolver++"
    assert cfg("DPM++ 2M SDE Heun").solver_type == "heun"
    assert cfg("DPM++ 3M SDE").solver_order == 3
    assert cfg("DPM++ 2M").final_sigmas_type == "zero"
    assert cfg("euler", "beta").use_beta_sigmas is True
    assert cfg("euler", "sgm_uniform").timestep_spacing == "trailing"
    assert cfg("euler", "simple").timestep_spacing == "trailing"
    assert cfg("euler", "ddim_uniform").timestep_spacing == "leading"
    assert cfg("Euler a Karras").timestep_spacing == "linspace"

    def timesteps(name, scheduler=None, steps=4):
        sched = make_scheduler(resolve_sampler(name, scheduler), SDXL_CONFIG)
        sched.set_timesteps(steps)
        return sched.timesteps.round().long().tolist()

    assert timesteps("Euler") == [999, 666, 333, 0]  # A1111: evenly over the whole schedule
    assert timesteps("euler", "sgm_uniform") == [999, 749, 499, 249]
    assert timesteps("euler", "ddim_uniform") == [751, 501, 251, 1]
    assert timesteps("DDIM") == [751, 501, 251, 1]


def test_one_step_needs_trailing_spacing():
    # diffusers' "linspace" grid for one step is t=0 (A1111 would take t=999), so one-step jobs
    # (turbo/lightning models) should ask for sgm_uniform, which starts at the top.
    sched = make_scheduler(resolve_sampler("Euler a", "sgm_uniform"), SDXL_CONFIG)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]
    sched = make_scheduler(resolve_sampler("Euler a"), SDXL_CONFIG)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [0]


def test_model_config_schedule_settings_are_overridden():
    # a model shipped with a DPM++ 2M Karras config must still run plain Euler for "Euler"
    config = {
        **SDXL_CONFIG,
        "use_karras_sigmas": True,
        "use_exponential_sigmas": True,
        "interpolation_type": "log_linear",
        "timestep_spacing": "trailing",
        "algorithm_type": "dpmsolver++",
        "solver_order": 3,
        "use_lu_lambdas": True,
    }
    sched = make_scheduler(resolve_sampler("Euler"), config)
    assert sched.config.use_karras_sigmas is False
    assert sched.config.use_exponential_sigmas is False
    assert sched.config.interpolation_type == "linear"
    assert sched.config.timestep_spacing == "linspace"
    dpm = make_scheduler(resolve_sampler("DPM++ 2M SDE"), config)
    assert dpm.config.use_karras_sigmas is False
    assert dpm.config.use_exponential_sigmas is True
    assert dpm.config.solver_order == 2
    assert dpm.config.use_lu_lambdas is False


def _same_state(a, b) -> None:
    assert dict(a.config) == dict(b.config)
    assert type(a) is type(b)
    assert set(vars(a)) == set(vars(b))
    for key, value in vars(a).items():
        other = vars(b)[key]
        if isinstance(value, torch.Tensor):
            assert value.shape == other.shape, key
            assert torch.allclose(value, other, rtol=0, atol=0, equal_nan=True), key
            assert value.data_ptr() != other.data_ptr() or value.numel() == 0, key
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, other, err_msg=key)
        elif key != "_internal_dict":
            assert value == other, key


def _equivalence_choices() -> list[SamplerChoice]:
    """Every sampler at its default schedule, and every schedule on three classes."""
    chosen = [_entry_choice(e) for e in S.SAMPLERS]
    chosen += [resolve_sampler(n, s) for n in ("Euler", "DPM++ SDE", "DPM2") for s in SCHEDULERS]
    return list(dict.fromkeys(chosen))


@pytest.mark.parametrize("choice", _equivalence_choices(), ids=_choice_id)
def test_make_scheduler_is_what_from_config_builds(choice):
    cls_name, options, seed_option = scheduler_plan(choice)
    cls = getattr(diffusers, cls_name)
    kwargs = dict(options)
    if choice.seeded_scheduler:
        kwargs[seed_option] = 9
    direct = cls.from_config(schedulers._scheduler_config(cls, SDXL_CONFIG), **kwargs)
    used = make_scheduler(choice, SDXL_CONFIG, seed=9)
    used.set_timesteps(5)  # a job runs on one instance...
    made = make_scheduler(choice, SDXL_CONFIG, seed=9)  # ...and the next one starts clean
    assert made is not used
    _same_state(made, direct)
    made.set_timesteps(6)
    direct.set_timesteps(6)
    _same_state(made, direct)


def test_make_scheduler_is_fresh_and_leaves_the_config_alone():
    pipe_config = build_tiny_sdxl().scheduler.config
    for base in (SDXL_CONFIG, pipe_config):
        before = copy.deepcopy(dict(base))
        for choice in _equivalence_choices():
            a = make_scheduler(choice, base, seed=1)
            b = make_scheduler(choice, base, seed=1)
            assert a is not b and a.config is not b.config
            a.set_timesteps(5)
            a.register_to_config(steps_offset=7)
            assert b.config.get("steps_offset") != 7 or base.get("steps_offset") == 7
            assert make_scheduler(choice, base, seed=1).config == b.config
        assert dict(base) == before
    # the seed reaches the Brownian tree, and the table's options stay untouched
    cls_name, options, seed_option = scheduler_plan(resolve_sampler("DPM++ SDE", "karras"))
    assert seed_option == "noise_sampler_seed"
    assert "noise_sampler_seed" not in options
    sde = resolve_sampler("DPM++ SDE")
    assert make_scheduler(sde, SDXL_CONFIG, seed=42).noise_sampler_seed == 42
    assert make_scheduler(sde, SDXL_CONFIG, seed=7).config.noise_sampler_seed == 7
    assert make_scheduler(sde, SDXL_CONFIG).noise_sampler_seed is None


def test_model_configs_do_not_share_schedulers():
    v_pred = {**SDXL_CONFIG, "prediction_type": "v_prediction"}
    choice = resolve_sampler("DPM++ 2M Karras")
    assert make_scheduler(choice, v_pred).config.prediction_type == "v_prediction"
    assert make_scheduler(choice, SDXL_CONFIG).config.prediction_type == "epsilon"
    betas = {**SDXL_CONFIG, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}
    other = {**SDXL_CONFIG, "trained_betas": np.linspace(1e-4, 0.03, 1000).tolist()}
    a = make_scheduler(choice, betas)
    b = make_scheduler(choice, other)
    assert not torch.equal(a.alphas_cumprod, b.alphas_cumprod)


def test_repeated_calls_copy_the_prototype_into_independent_equal_schedulers():
    # How much the copy saves is measured by scripts/bench_samplers.py, not asserted here.
    choices = _all_choices()
    first = {choice: make_scheduler(choice, SDXL_CONFIG, seed=1) for choice in choices}
    before = schedulers._prototype.cache_info()
    for choice in choices:
        again = make_scheduler(choice, SDXL_CONFIG, seed=1)
        assert again is not first[choice]
        _same_state(again, first[choice])
    after = schedulers._prototype.cache_info()
    assert after.misses == before.misses  # nothing built from the config again...
    # ...except the seeded ones, which are built with their seed every time
    assert after.hits - before.hits == len([c for c in choices if not c.seeded_scheduler])


def test_make_scheduler_does_not_log_for_foreign_config_keys(caplog):
    caplog.set_level("INFO")
    for choice in _all_choices():
        make_scheduler(choice, SDXL_CONFIG, seed=1)
    assert not [r for r in caplog.records if "were passed to" in r.getMessage()]


# --- sigma schedules against their closed forms -----------------------------------------


def _sdxl_sigma_range() -> tuple[float, float]:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    return float(sigmas[0]), float(sigmas[-1])


def _karras(n: int, lo: float, hi: float, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _exponential(n: int, lo: float, hi: float) -> np.ndarray:
    return np.exp(np.linspace(np.log(hi), np.log(lo), n))


def _beta(n: int, lo: float, hi: float) -> np.ndarray:
    import scipy.stats

    ppf = scipy.stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), 0.6, 0.6)
    return lo + ppf * (hi - lo)


def test_sdxl_sigma_range():
    lo, hi = _sdxl_sigma_range()
    assert lo == pytest.approx(0.0292, abs=1e-4)
    assert hi == pytest.approx(14.6146, abs=1e-3)


@pytest.mark.parametrize(
    "name", ["Euler", "LMS", "Heun", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE", "UniPC", "deis"]
)
@pytest.mark.parametrize(
    ("schedule", "formula"),
    [("karras", _karras), ("exponential", _exponential), ("beta", _beta)],
)
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_sigma_schedules_match_closed_forms(name, schedule, formula, steps):
    lo, hi = _sdxl_sigma_range()
    sched = make_scheduler(resolve_sampler(name, schedule), SDXL_CONFIG)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double().numpy()
    if name == "Heun":  # Heun repeats each inner sigma for its second evaluation
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
    if name == "deis":  # DEIS ends at sigma_min (no final_sigmas_type option)
        assert sigmas[-1] == sigmas[-2]
    elif name == "UniPC":  # ends at sigma_min: bh1 cannot step to sigma 0 in diffusers
        assert sigmas[-1] == pytest.approx(lo, rel=1e-4)
    else:
        assert sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas[:-1], formula(steps, lo, hi), rtol=2e-4)


def test_beta_schedule_needs_scipy():
    import importlib.util

    assert importlib.util.find_spec("scipy") is not None, "add scipy to the dependencies"


# --- images on the tiny SDXL pipeline ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl():
    # One intra-op thread: the tiny model is all overhead, and a busy 2-core box otherwise
    # spends its time in thread hand-offs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def _view(pipe, sched, **own):
    """A pipeline sharing `pipe`'s models, with its own scheduler (and whatever `own` gives)."""
    view = type(pipe)(**{**pipe.components, "scheduler": sched, **own})
    view.set_progress_bar_config(disable=True)
    return view


def _generate(pipe, choice, seed, *, noise_seed=None, latents=None, steps=4, own=None):
    noise_seed = seed if noise_seed is None else noise_seed
    sched = make_scheduler(choice, pipe.scheduler.config, noise_seed)
    out = _view(pipe, sched, **(own or {}))(
        prompt="a red fox in the snow",
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        latents=latents,
        output_type="np",
    )
    return out.images[0]


def _check_image(image):
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert float(image.max() - image.min()) > 0


def _plan_key(choice: SamplerChoice) -> tuple:
    cls_name, options, _ = scheduler_plan(choice)
    return cls_name, tuple(sorted(options.items()))


@pytest.fixture(scope="module")
def images_by_plan(tiny_sdxl):
    """One 4-step image per distinct scheduler setup among every name and every schedule."""
    choices = [resolve_sampler(name) for name in ALL_NAMES] + _all_choices()
    images = {}
    for choice in choices:
        key = _plan_key(choice)
        if key not in images:
            images[key] = _generate(tiny_sdxl, choice, seed=11)
    return images


def test_every_name_makes_an_image(tiny_sdxl, images_by_plan):
    before = dict(tiny_sdxl.scheduler.config)
    for name in ALL_NAMES:
        _check_image(images_by_plan[_plan_key(resolve_sampler(name))])
    assert dict(tiny_sdxl.scheduler.config) == before  # the shared pipeline is untouched
    assert type(tiny_sdxl.scheduler).__name__ == "EulerDiscreteScheduler"


def test_every_sampler_and_schedule_makes_an_image(images_by_plan):
    for choice in _all_choices():
        _check_image(images_by_plan[_plan_key(choice)])


def test_same_spelling_both_ways_gives_the_same_image(tiny_sdxl):
    a = _generate(tiny_sdxl, resolve_sampler("DPM++ 2M Karras"), seed=5)
    b = _generate(tiny_sdxl, resolve_sampler("dpmpp_2m", "karras"), seed=5)
    np.testing.assert_array_equal(a, b)
    a = _generate(tiny_sdxl, resolve_sampler("Euler"), seed=5)
    b = _generate(tiny_sdxl, resolve_sampler("euler", "normal"), seed=5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_are_deterministic_per_seed(tiny_sdxl, name):
    choice = resolve_sampler(name)
    first = _generate(tiny_sdxl, choice, seed=21)
    again = _generate(tiny_sdxl, choice, seed=21)
    np.testing.assert_array_equal(first, again)
    # Same starting latents, so only the sampler's own noise can tell the seeds apart.
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(21))
    same = _generate(tiny_sdxl, choice, seed=21, latents=latents.clone())
    if choice.seeded_scheduler:  # the Brownian tree follows the scheduler's seed
        other = _generate(tiny_sdxl, choice, seed=21, noise_seed=22, latents=latents.clone())
    else:  # step noise follows the job's generator
        other = _generate(tiny_sdxl, choice, seed=22, latents=latents.clone())
    assert not np.array_equal(same, other)


def test_concurrent_jobs_match_sequential_ones(tiny_sdxl):
    names = [
        "Euler",
        "Euler a",
        "DPM++ 2M Karras",
        "DPM++ SDE Karras",
        "DPM++ 2M SDE",
        "DDIM",
        "UniPC",
        "Heun",
    ]
    jobs = [(resolve_sampler(name), 100 + i) for i, name in enumerate(names)]
    sequential = [_generate(tiny_sdxl, choice, seed) for choice, seed in jobs]
    # Models are shared; tokenizers are not: a transformers fast tokenizer switches its
    # padding/truncation state on every call, so one shared between threads is unsafe.
    tokenizers = ("tokenizer", "tokenizer_2")
    own = [{name: copy.deepcopy(getattr(tiny_sdxl, name)) for name in tokenizers} for _ in jobs]

    results: list[np.ndarray | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = _generate(tiny_sdxl, *jobs[i], own=own[i])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for name, seq, par in zip(names, sequential, results, strict=True):
        assert par is not None, name
        np.testing.assert_array_equal(seq, par, err_msg=name)


def test_sd15_pipeline_takes_the_schedulers():
    pipe = build_tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    for name in ("DPM++ 2M Karras", "DPM++ SDE", "DDIM", "Euler a"):
        choice = resolve_sampler(name)
        view = StableDiffusionPipeline(
            **{**pipe.components, "scheduler": make_scheduler(choice, pipe.scheduler.config, 1)}
        )
        view.set_progress_bar_config(disable=True)
        image = view(
            prompt="a cat",
            num_inference_steps=4,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type="np",
        ).images[0]
        _check_image(image)


# --- docs -----------------------------------------------------------------------------


def test_table_lists_every_name_and_is_in_the_docs():
    table = sampler_table_markdown()
    for entry in S.SAMPLERS:
        assert f"`{entry.name}`" in table or not entry.a1111
        for name in (*entry.comfy, *entry.aliases):
            assert f"`{name}`" in table
        assert f"`{entry.cls.name}`" in table
    for name in COMFY_IDS + A1111_NAMES:
        assert f"`{name}`" in table
    assert "closest" in table and "exact" in table
    docs = (ROOT / "docs" / "samplers.md").read_text()
    assert table.strip() in docs, "regenerate docs/samplers.md from sampler_table_markdown()"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert table.strip() in readme, "regenerate README.md's table from sampler_table_markdown()"
