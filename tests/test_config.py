"""The config tree composes for every option, and bad input is a one-line error with exit 2."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from selfimprove.cli import group_options, main
from tests.conftest import compose_cfg, selfimprove

GROUP_OPTIONS = [(g, o) for g, opts in group_options().items() for o in opts]


def test_default_is_the_embedded_cpu_demo():
    cfg = compose_cfg([])
    assert (cfg.model.name, cfg.dataset.name, cfg.method.name) == ("tiny", "arithmetic", "star")
    assert (cfg.hardware.name, cfg.generator.backend.value, cfg.logger.kind.value) == ("cpu", "auto", "none")


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group not in ("experiment", "debug"):  # those two set keys of other groups
        assert cfg[group] is not None


@pytest.mark.parametrize("method", group_options()["method"])
def test_debug_tiny_shrinks_every_method(method):
    """debug=tiny composes with every method (its keys exist there) and shortens its warm start;
    debug=none is the config as it was; a key on the command line wins over debug's."""
    base, tiny = compose_cfg([f"method={method}"]), compose_cfg([f"method={method}", "debug=tiny"])
    assert tiny.method.warmstart.steps < base.method.warmstart.steps
    assert tiny.model.intermediate_size < base.model.intermediate_size
    assert compose_cfg([f"method={method}", "debug=none"]) == base
    assert (
        compose_cfg([f"method={method}", "debug=tiny", "method.warmstart.steps=7"]).method.warmstart.steps
        == 7
    )


@pytest.mark.parametrize("dataset", group_options()["dataset"])
def test_debug_tiny_shrinks_every_dataset(dataset):
    base, tiny = compose_cfg([f"dataset={dataset}"]), compose_cfg([f"dataset={dataset}", "debug=tiny"])
    sizes = (
        "seed_per_level",
        "seed_size",
        "train_per_iteration",
        "train_size",
        "test_per_level",
        "test_size",
    )
    shrunk = [k for k in sizes if k in tiny.dataset and tiny.dataset[k] != base.dataset[k]]
    assert shrunk and all(base.dataset[k] is None or tiny.dataset[k] < base.dataset[k] for k in shrunk)


def test_experiment_overrides_only_what_differs():
    assert compose_cfg(["experiment=star_control"]).method.train_on_samples is False
    assert compose_cfg(["experiment=star_rationalize"]).method.rationalize is True


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("dataset=nope", "unknown dataset option 'nope'; available: arithmetic"),
        ("method=sttar", "did you mean 'star'"),
        ("method.iterations=abc", "method.iterations"),
        ("method.nonsense=1", "method.nonsense"),
        ("generator.backend=tpu", "expected one of [auto, hf, vllm]"),
        ("hardware.dtype=fp8", "hardware.dtype"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, override, expected):
    proc = selfimprove("run", override, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists(), "nothing may be written for bad input"


def test_bad_sweep_value_is_caught_before_any_job(tmp_path):
    proc = selfimprove("run", "-m", "dataset=arithmetic,nope", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "'nope'" in proc.stderr
    assert not (tmp_path / "multirun").exists()


def test_stop_after_unknown_stage_lists_the_stages(tmp_path):
    proc = selfimprove("run", "stop_after=iter_09/nothing", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "names no stage of this run; stages: init, warmstart/data" in proc.stderr


def test_help_lists_groups_and_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for group, option in GROUP_OPTIONS:
        assert group in out and option in out
    assert "star*" in out and "tiny*" in out


def test_unknown_command(capsys):
    assert main(["rnu"]) == 2
    assert "did you mean 'run'" in capsys.readouterr().err
