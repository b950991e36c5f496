"""The sampler registry: names and descriptions without torch / diffusers; every name builds its scheduler."""

import subprocess
import sys

import pytest

from fastdiff.samplers.registry import (
    BUILTIN_SAMPLERS,
    available_samplers,
    make_scheduler,
    register_sampler,
    sampler_description,
)


def test_listing_imports_neither_torch_nor_diffusers():
    code = ("import sys; from fastdiff.samplers.registry import available_samplers, sampler_description; "
            "names = available_samplers(); [sampler_description(n) for n in names]; "
            "assert 'ddim' in names and 'accel_ddim' in names; "
            "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_builtin_builds_from_a_ddpm_config():
    from diffusers import DDPMScheduler, SchedulerMixin

    config = DDPMScheduler(beta_schedule="scaled_linear").config
    for name in BUILTIN_SAMPLERS:
        sched = make_scheduler(name, config)
        assert isinstance(sched, SchedulerMixin), name
        assert sched.config.beta_schedule == "scaled_linear", name
        for key, value in BUILTIN_SAMPLERS[name].overrides.items():
            assert sched.config[key] == value, (name, key)
        assert sampler_description(name)


def test_unknown_name_and_registration(monkeypatch):
    from fastdiff.samplers import registry

    monkeypatch.setattr(registry, "_REGISTERED", {})
    with pytest.raises(ValueError, match="unknown sampler 'nope'.*ddim"):
        make_scheduler("nope", {})
    with pytest.raises(TypeError, match="factory"):
        register_sampler("x", 3, "")
    register_sampler("test_only_sampler", lambda cfg: ("built", dict(cfg)), "a test sampler")
    assert "test_only_sampler" in available_samplers()
    assert make_scheduler("test_only_sampler", {"a": 1}) == ("built", {"a": 1})
    assert sampler_description("test_only_sampler") == "a test sampler"
