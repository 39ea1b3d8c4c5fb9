"""Settings checked before a run writes anything: keys no schema knows (``+seeed=3``), numbers out
of range (``generator.batch_size=0``), and paths that do not exist or cannot be written.

Composition already refuses wrong types, bad enum values and unknown keys without ``+``; Hydra's
``+key=value`` adds a key to a typed node anyway, so :func:`check_keys` walks the composed config
against the schemas of selfimprove/config.py. Every check raises ConfigError: one line naming the
key, its value and the fix (``preflight.check_config`` calls them).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from selfimprove.engine.registry import ConfigError

# -- keys ------------------------------------------------------------------------------------------


def schema_nodes(node: DictConfig, path: str = "") -> Iterator[tuple[str, DictConfig, type]]:
    """(dotted path, node, schema) of every node typed by a dataclass of selfimprove/config.py; nodes
    typed Any (``method.rl.extra``, ``dataset.task_config``, ``lora``) take any key and are skipped."""
    schema = OmegaConf.get_type(node)
    if not (dataclasses.is_dataclass(schema) and schema.__module__ == "selfimprove.config"):
        return
    yield path, node, schema
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            yield from schema_nodes(child, f"{path}{key}.")


def check_keys(cfg: DictConfig) -> None:
    """A key that no schema declares (added with ``+`` or ``++``) is refused with a did-you-mean:
    it would otherwise be ignored, and the run would silently not be the one asked for."""
    for path, node, schema in schema_nodes(cfg):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean '{path}{close[0]}'? " if close else ""
                where = f"'{path.rstrip('.')}'" if path else "the top level"
                raise ConfigError(
                    f"unknown setting '{path}{key}': {hint}no setting of that name at {where} "
                    f"(known: {', '.join(known)}); drop the override or fix its name"
                )


# -- ranges ----------------------------------------------------------------------------------------
#: ranges by key name, at any depth of the schema-typed config; ``parent.key`` or ``Schema.key`` for one
#: place's key (``method.warmstart.steps=0`` skips the warm start; ``model.optim.lr.sft`` is a rate)
AT_LEAST_ONE = (
    "steps batch_size micro_batch_size n max_tokens star_iterations test_per_level test_size num_generations "
    "max_completion_length max_length workers samples max_per_prompt games problems solutions "
    "items_per_adapter prompts_per_iteration queries n_star monitor_s critique_tokens num_threads num_processes "
    "tensor_parallel_size data_parallel_size r rank k top_k digits cpu_seconds memory_mb nproc "
    "file_size_mb disk_mb open_files output_bytes prompt_tokens completion_tokens hidden_size num_layers "
    "num_heads num_kv_heads intermediate_size max_position_embeddings test_levels seed_levels train_levels "
    "bench_levels game_levels"
).split()
AT_LEAST_ZERO = (
    "iterations rounds stage2_iterations max_rounds steps_growth temperature temperatures logprobs "
    "warmup_ratio weight_decay beta seed_per_level few_shot_per_level train_per_iteration seed_size "
    "train_size replay_min exemplar_examples warmstart.steps"
).split()
POSITIVE = (
    "steps_factor lr LearningRates.sft LearningRates.rl LearningRates.dpo timeout memory_gb scale".split()
)
#: fractions: key -> (low, high, low allowed, high allowed)
FRACTIONS = {
    "top_p": (0, 1, False, True),
    "gpu_memory_utilization": (0, 1, False, True),
    "dropout": (0, 1, True, False),
    "warmup_ratio": (0, 1, True, True),
}


def rule(path: str, schema: type, key: str) -> tuple[float, float, bool, bool] | None:
    """(low, high, low allowed, high allowed) for a key of a schema-typed node at ``path``, None when
    unchecked. A rule for ``parent.key`` or ``Schema.key`` wins over one for the key's name."""
    parent = path.rstrip(".").rsplit(".", 1)[-1]
    for name in (f"{parent}.{key}", f"{schema.__name__}.{key}", key):
        if name in FRACTIONS:
            return FRACTIONS[name]
        if name in AT_LEAST_ZERO:
            return (0, float("inf"), True, True)
        if name in AT_LEAST_ONE:
            return (1, float("inf"), True, True)
        if name in POSITIVE:
            return (0, float("inf"), False, True)
    return (0, 1, True, True) if key.endswith("_fraction") else None


def in_range(value: float, low: float, high: float, low_ok: bool, high_ok: bool) -> bool:
    above = value >= low if low_ok else value > low
    below = value <= high if high_ok else value < high
    return above and below


def range_text(low: float, high: float, low_ok: bool, high_ok: bool) -> str:
    if high == float("inf"):
        return f"{'at least' if low_ok else 'greater than'} {low:g}"
    return f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"


def numbers(value) -> list[float]:
    """The numbers a setting holds: itself, or a list's items (``eval.k=[1,4,8]``); bools are not."""
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_ranges(cfg: DictConfig) -> None:
    """Every counted or scaled setting in its range: sizes, batches and steps at least 1, iterations,
    temperatures and counts of optional data at least 0, learning rates above 0, fractions in [0, 1].
    ``hardware.num_threads=0`` would mean all cores to torch and ``generator.batch_size=0`` one
    sequence: refused here instead of taken as something else."""
    for path, node, schema in schema_nodes(cfg):
        for key in node.keys():
            bounds = rule(path, schema, str(key))
            if bounds is None or OmegaConf.is_missing(node, key):
                continue
            value = node[key]
            bad = [v for v in numbers(value) if not in_range(v, *bounds)]
            if bad:
                source = node._get_node(key)._value()
                via = f" (from {source})" if isinstance(source, str) and "${" in source else ""
                shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
                each = "" if len(numbers(value)) == 1 else f"each item ({bad[0]:g} is not) "
                meaning = " (0 = evaluate the starting model only)" if key in ROUNDS else ""
                raise ConfigError(
                    f"{path}{key}={shown}{via} is out of range: {each}must be {range_text(*bounds)}{meaning}"
                )


# -- paths -----------------------------------------------------------------------------------------
def looks_local(name: str) -> bool:
    """A model or dataset named by a path rather than a hub id (``org/name``)."""
    return name.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(name))


def check_model_source(model: DictConfig) -> None:
    """``model=hub`` needs ``model.name_or_path``: a local folder holding config.json, or a hub id."""
    if model.source != "hub":
        return
    if OmegaConf.is_missing(model, "name_or_path"):
        raise ConfigError(
            "model=hub needs the model: set model.name_or_path=ORG/NAME (a hub id, e.g. Qwen/Qwen2.5-0.5B) "
            "or model.name_or_path=/path/to/folder (a local Hugging Face model folder)"
        )
    name = str(model.name_or_path)
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(
                f"model.name_or_path={name}: no such folder; point it at a local model folder (with config.json) "
                "or give a hub id (ORG/NAME)"
            )
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path={name} is not a model folder (no config.json in it); point it at the folder "
                "save_pretrained wrote"
            )
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(
            f"model.name_or_path={name} is neither a local folder nor a hub id (ORG/NAME); check the spelling"
        ) from None


def check_dataset_sources(dataset: DictConfig) -> None:
    """Local dataset files (``dataset.train.path=/data/x.jsonl``) exist, are readable and parse."""
    from selfimprove.tasks.hf_math import check_local_file

    for split in ("train", "test"):
        source = dataset.get(split) if isinstance(dataset.get(split), DictConfig) else None
        if source is None or "path" not in source or OmegaConf.is_missing(source, "path"):
            continue
        path = str(source.path)
        if looks_local(path):
            check_local_file(Path(path).expanduser(), f"dataset.{split}.path")


def writable_place(path: Path, key: str) -> str | None:
    """Why ``path`` (a folder the run will create or write in) cannot be written, or None."""
    try:
        return place_problem(path, key)
    except OSError as err:  # a folder on the way that this user cannot enter
        return f"{key}: cannot reach {path} ({err.strerror}: {err.filename}); choose another {key}"


def place_problem(path: Path, key: str) -> str | None:
    if path.exists():
        if not path.is_dir():
            return f"{key}: {path} is a file, not a folder; move it away or choose another {key}"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{key}: {path} is not writable; make it writable or choose another {key}"
        return None
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return (
            f"{key}: cannot create {path}, because {parent} is a file; move it away or choose another {key}"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}: cannot create {path} in {parent}, which is not writable; choose another {key}"
    return None


def check_places(cfg: DictConfig, root: Path) -> None:
    """The run directory (and the shared-stage store) can be created and written."""
    key = "run_dir" if cfg.run_dir else "out_root"
    problem = writable_place(Path(root), key)
    if problem is None and cfg.store and cfg.store_dir:
        problem = writable_place(Path(cfg.store_dir), "store_dir")
    if problem:
        raise ConfigError(problem)


def check_settings(cfg: DictConfig) -> None:
    """Keys, ranges and the model's and dataset's sources (the run directory: :func:`check_places`)."""
    check_keys(cfg)
    check_ranges(cfg)
    check_model_source(cfg.model)
    if cfg.model.source == "tiny":
        from selfimprove.models import check_characters

        check_characters(cfg.model)
    check_dataset_sources(cfg.dataset)


#: each method's count of improvement rounds: 0 = the warm start and the evaluation of M0 only
ROUNDS = ("iterations", "rounds", "max_rounds")


def zero_iterations(cfg: DictConfig) -> list[str]:
    """The note a run with no improvement round gets: it trains the warm start (M0) and evaluates it."""
    key = next((k for k in ROUNDS if k in cfg.method), None)
    if key is None or cfg.method[key] != 0:
        return []
    return [f"method.{key}=0: only the warm start runs and the starting model (M0) is evaluated"]
