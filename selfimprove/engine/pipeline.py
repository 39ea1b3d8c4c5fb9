"""Resumable, fingerprinted stages inside a run directory.

The contract (docs: DESIGN.md §2):

- A stage is ``fn(out: Path, **inputs) -> dict | None`` marked ``@stage(name=..., version=...)``. Its
  **fingerprint** hashes that registered name and version with its inputs (not the module path, so
  moving or renaming the function keeps finished runs); an input that is an :class:`Artifact` contributes its own
  fingerprint, so a change upstream changes every stage downstream.
- A stage writes into ``<name>.partial/``, which is renamed to ``<name>/`` when the function
  returns; ``_DONE.json`` (fingerprint, times, counts, library versions, the size of every output
  file) is written last, atomically and durably (selfimprove/markers.py). Only a folder whose
  ``_DONE.json`` is whole, carries the expected fingerprint and whose files still have the sizes it
  lists counts as done; anything else is ``damaged`` and recomputed, said in one line.
- Re-running the same command skips (loads) done stages and restarts the first unfinished one. A
  stage marked ``resumable`` keeps its ``.partial/`` folder across a kill so that it can continue
  from its own checkpoints; any other stage starts from an empty folder.
- The run carries a ``context`` (generator and hardware, set once by app.py) and a base
  ``seed``: a stage function whose signature requires one of those by name (no default) and whose
  call did not pass it gets it filled in (an iteration's stages get the iteration's seed). Filled
  inputs are hashed as if passed; an input equal to its parameter's default is left out of the
  fingerprint, so adding an optional parameter to a stage keeps every finished run.
- A done stage whose fingerprint no longer matches is recomputed (``on_change=recompute``, said
  out loud) or refused (``on_change=refuse``).
- ``metrics.jsonl`` is a view: each run rewrites the lines of the iterations it reaches from their
  stages' outputs, so a damaged or truncated one is rebuilt (:func:`read_metrics` reads what is whole).
- With a ``store`` (selfimprove/store.py) a stage that another run already computed with the same
  fingerprint is linked into this run directory instead (event ``shared``), under the same contract.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from selfimprove.engine.errors import StageFailed, explain
from selfimprove.engine.markers import DONE, damage, outputs_of, read_marker, sync_folder, sync_tree
from selfimprove.engine.registry import ConfigError

EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"


class StopRequested(Exception):
    """Raised after the stage named by ``stop_after`` is done."""

    def __init__(self, stage: str):
        super().__init__(f"stopped after stage '{stage}'")
        self.stage = stage


@dataclass(frozen=True)
class Artifact:
    """The output folder of a stage, identified by its fingerprint."""

    name: str
    path: Path
    fingerprint: str

    def file(self, relative: str) -> Path:
        return self.path / relative

    def done_record(self) -> dict:
        return read_marker(self.path / DONE)[0] or {}

    def summary(self) -> dict:
        """What this stage reports for the per-iteration metrics line: its metrics.json if it
        wrote one, else the counts it returned."""
        metrics = self.path / "metrics.json"
        if metrics.exists():
            return json.loads(metrics.read_text())
        return dict(self.done_record().get("counts", {}))


#: every stage by its registered name (names are unique: the name is the stage's identity)
STAGES: dict[str, Callable] = {}


def stage(name: str, version: int = 1, resumable: bool = False) -> Callable:
    """Mark a function as the stage ``name``. The fingerprint holds the name, not the module path,
    so the function may move or be renamed freely. Bump ``version`` when its output for the same
    inputs changes, so that finished runs recompute it instead of reusing stale artifacts."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"@stage needs a non-empty name, got {name!r}")

    def mark(fn: Callable) -> Callable:
        taken = STAGES.get(name)
        if taken is not None and taken.__qualname__ != fn.__qualname__:  # same qualname: reloaded or moved
            raise ValueError(f"stage name '{name}' is already used by {where(taken)}; choose another name")
        fn.stage_name = name
        fn.stage_version = version
        fn.stage_resumable = resumable
        STAGES[name] = fn
        return fn

    return mark


def where(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


# --------------------------------------------------------------------------------------------
# Small file helpers shared by every stage.


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a temporary file, fsync it, rename it over ``path`` and fsync the folder: after a
    machine crash ``path`` holds the old text or the new one, never a mix or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_folder(path.parent)


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The whole lines of a metrics.jsonl (one object with an integer ``iteration`` each) and, when
    some are not, what is wrong: it is a derived file, rebuilt from the stages' outputs."""
    if not path.exists():
        return [], f"{path.name} is missing"
    try:
        text = path.read_bytes().decode()
    except (OSError, UnicodeDecodeError) as err:
        return [], f"{path.name} cannot be read ({err.__class__.__name__})"
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
        elif line.strip():
            bad.append(number)
    if bad:
        return rows, f"{path.name} line {bad[0]} is damaged ({len(bad)} bad line(s), {len(rows)} whole)"
    if not rows:
        return [], f"{path.name} is empty"
    return rows, None


def plain(value: Any) -> Any:
    """Config nodes to plain containers, so that they hash and serialise."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def describe(value: Any, artifact: Callable[[Artifact], Any]) -> Any:
    """A JSON-able view of a stage input; artifacts (also inside lists) are shown by ``artifact``."""
    if isinstance(value, Artifact):
        return artifact(value)
    if isinstance(value, (list, tuple)):
        return [describe(v, artifact) for v in value]
    if isinstance(value, Path):
        return str(value)
    return plain(value)


def parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """A stage function's inputs: its parameters after ``out``."""
    return dict(list(inspect.signature(fn).parameters.items())[1:])


def at_default(value: Any, param: inspect.Parameter | None) -> bool:
    """Whether an (encoded) input equals its parameter's default, of the same type (so ``1`` is not
    taken for a default ``True``)."""
    if param is None or param.default is inspect.Parameter.empty:
        return False
    return type(value) is type(param.default) and value == param.default


def fingerprint_of(fn: Callable, inputs: dict[str, Any], neutral: Iterable[str] = ()) -> str:
    """The hash of the stage's registered name and version and its inputs. An input equal to its
    parameter's default is left out, so that a stage may gain an optional parameter without
    changing finished runs' fingerprints. ``neutral``: dotted keys (``hardware.num_threads``) of
    inputs that do not change the result; they are left out, so that resuming with other such
    settings reuses what was done. ``key=value`` (``model.position_encoding=rope``) leaves a key out
    only at that value: a config key added after runs were made keeps those runs at its default."""

    def encode(v: Any) -> Any:
        return describe(v, lambda a: {"artifact": a.fingerprint})

    params = parameters(fn)
    encoded = {k: encode(v) for k, v in sorted(inputs.items())}
    encoded = {k: v for k, v in encoded.items() if not at_default(v, params.get(k))}
    for key in neutral:
        dotted, only_at, value = key.partition("=")
        name, _, sub = dotted.partition(".")
        if (
            sub
            and isinstance(encoded.get(name), dict)
            and (not only_at or str(encoded[name].get(sub)) == value)
        ):
            encoded[name].pop(sub, None)
    if not hasattr(fn, "stage_name"):
        raise TypeError(f"{where(fn)} is not a stage; mark it with @stage(name=...)")
    payload = {
        "stage": fn.stage_name,
        "version": fn.stage_version,
        "inputs": encoded,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("selfimprove", "torch", "transformers", "trl", "peft", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def matches_stop(stop_after: str, name: str) -> bool:
    """``stop_after`` names a stage fully (iter_01/generate) or by its last part (generate)."""
    return stop_after == name or stop_after == name.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------


@dataclass
class StageStatus:
    name: str
    fingerprint: str
    # done | pending | changed | partial | damaged (marker or output files broken: recomputed)
    # | shared (in the store, linked when the run gets there)
    state: str
    fn: Callable | None = None
    inputs: dict = field(default_factory=dict)  # plain values and artifacts, for the plan's estimates
    why: str = ""  # for changed and damaged: what differs or what is broken


def refusal(name: str, root: Path, why: str) -> ConfigError:
    """on_change=refuse meeting a stage done with other settings (said before anything is written)."""
    return ConfigError(
        f"stage '{name}' in {root} was {why}; rerun with on_change=recompute or choose another run directory"
    )


@dataclass
class Run:
    """One run directory. Methods call :meth:`stage`; everything else (skip, atomic write,
    markers, stop_after, events) happens here.

    With ``plan_only`` no stage runs: each call records the stage's status and returns the
    artifact it would produce, which is how ``selfimprove status`` and the up-front check of
    ``stop_after`` see the whole pipeline without computing it.
    """

    root: Path
    stop_after: str | None = None
    on_change: str = "recompute"
    plan_only: bool = False
    replay: bool = False  # with plan_only: record the metrics lines whose stages are all done
    log: Callable[[str], None] = print
    on_record: Callable[[dict], None] | None = None
    on_stage: Callable[[Artifact], None] | None = None  # each stage once done (computed, shared or reused)
    store: Any = None  # a selfimprove.engine.store.Store: stages with the same fingerprint are computed once
    # inputs any stage may require by name (app.py: generator, hardware), filled when not passed
    context: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # the run's base seed: its stages' ``seed``; an iteration's is Iteration.seed
    neutral: frozenset[str] = frozenset()  # input keys left out of fingerprints (fingerprint_of)
    plan: list[StageStatus] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"computed": 0, "reused": 0, "shared": 0})
    _lock_file: Any = None
    _stopped_after: str | None = None
    _rows: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.on_change not in ("recompute", "refuse"):
            raise ConfigError(f"on_change='{self.on_change}' is not allowed; use 'recompute' or 'refuse'")

    # -- locking: one process per run directory ------------------------------------------------
    def __enter__(self) -> Run:
        if not self.plan_only:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.root / ".lock", "a+")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                self._lock_file = None
                raise ConfigError(
                    f"run directory {self.root} is in use by another selfimprove process"
                ) from None
            rows, problem = read_metrics(self.root / METRICS)
            if problem and (self.root / METRICS).exists():
                self.log(f"[yellow]! {problem}; rebuilding it from the stages' outputs[/]")
            self._rows = {r["iteration"]: r for r in rows}
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    @property
    def stopped_after(self) -> str | None:
        """The stage that stop_after stopped the run at (None when the run went on)."""
        return self._stopped_after

    # -- stages ---------------------------------------------------------------------------------
    def iterations(self, n: int) -> Iterator[Iteration]:
        for index in range(1, n + 1):
            yield Iteration(self, index)

    def stage(self, name: str, fn: Callable, **inputs: Any) -> Artifact:
        """Run (or plan, or skip) the stage ``name``: ``fn`` with ``inputs`` and the run's context."""
        return self._stage(name, fn, self.filled(name, fn, inputs, self.seed))

    def filled(self, name: str, fn: Callable, inputs: dict[str, Any], seed: int | None) -> dict[str, Any]:
        """``inputs`` plus each context value (and ``seed``) that ``fn`` requires by name and the call
        did not pass: explicit values win; a parameter with a default is an option, left at its
        default when not passed. A missing or unknown input is refused here, at planning."""
        context = {**self.context, **({} if seed is None else {"seed": seed})}
        params = parameters(fn)
        needed = {k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in inputs}
        given = {k: v for k, v in context.items() if k in needed}
        try:
            inspect.signature(fn).bind(None, **given, **inputs)
        except TypeError as err:
            raise TypeError(f"stage '{name}' ({where(fn)}): {err}") from None
        return {**given, **inputs}

    def _stage(self, name: str, fn: Callable, inputs: dict[str, Any]) -> Artifact:
        if self._stopped_after is not None:  # raised here, not at once, so the method can record metrics
            raise StopRequested(self._stopped_after)
        fp = fingerprint_of(fn, inputs, self.neutral)
        path = self.root / name
        artifact = Artifact(name=name, path=path, fingerprint=fp)
        state, why = stage_state(path, fp)
        if self.plan_only:
            if state in ("pending", "partial") and self.store is not None and self.store.has(fp):
                state = "shared"
            self.plan.append(StageStatus(name, fp, state, fn, {k: plain(v) for k, v in inputs.items()}, why))
            return artifact
        if state == "done":
            self.counts["reused"] += 1
            self._event(name, "reused", fp)
        else:
            if state == "changed" and self.on_change == "refuse":
                raise refusal(name, self.root, why)
            if state in ("changed", "damaged"):
                from_store = self.store is not None and self.store.has(fp)
                self.log(
                    f"[yellow]! {name}: {why}; {'linking it again from the store' if from_store else 'recomputing'}[/]"
                )
            if self.store is None:
                self._compute(name, fn, inputs, path, fp)
            else:
                with self.store.lock(fp):
                    if self.store.fetch(fp, path, name):
                        self.counts["shared"] += 1
                        self._event(name, "shared", fp)
                        self.log(f"[green]✓ {name}[/] shared (same fingerprint in {self.store.root})")
                    else:
                        self._compute(name, fn, inputs, path, fp)
                        self.store.publish(fp, path)
        if self.on_stage is not None:
            self.on_stage(artifact)
        if self.stop_after is not None and matches_stop(self.stop_after, name):
            self._stopped_after = name
        return artifact

    def _compute(self, name: str, fn: Callable, inputs: dict, path: Path, fp: str) -> None:
        partial = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a folder without a valid marker: never trust it
            shutil.rmtree(path)
        keep = (
            getattr(fn, "stage_resumable", False)
            and (partial / ".fingerprint").exists()
            and ((partial / ".fingerprint").read_text() == fp)
        )
        if partial.exists() and not keep:
            shutil.rmtree(partial)
        partial.mkdir(exist_ok=True)
        (partial / ".fingerprint").write_text(fp)
        self.log(f"[bold cyan]▶ {name}[/]" + (" (continuing from its checkpoint)" if keep else ""))
        started = time.time()
        try:
            counts = fn(partial, **{k: plain(v) for k, v in inputs.items()}) or {}
        except Exception as err:
            if not keep and not getattr(fn, "stage_resumable", False):
                shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
            if isinstance(err, ConfigError):
                raise ConfigError(f"{name}: {err}") from err
            raise StageFailed(name, explain(err, where=path)) from err
        finished = time.time()
        (partial / ".fingerprint").unlink()
        sync_tree(partial)  # the outputs reach the disk before the marker that vouches for them
        os.replace(partial, path)
        sync_folder(path.parent)
        record = {
            "stage": name,
            "fingerprint": fp,
            "started": started,
            "finished": finished,
            "seconds": round(finished - started, 3),
            "counts": counts,
            "inputs": {k: describe(v, lambda a: a.name) for k, v in inputs.items()},
            "versions": library_versions(),
            "outputs": outputs_of(path),
        }
        write_json_atomic(path / DONE, record)
        self.counts["computed"] += 1
        self._event(name, "computed", fp, seconds=record["seconds"])
        summary = ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (dict, list)))
        self.log(f"[green]✓ {name}[/] {record['seconds']:.1f}s" + (f"  {summary}" if summary else ""))

    def _event(self, name: str, action: str, fp: str, **extra: Any) -> None:
        with open(self.root / EVENTS, "a") as f:
            f.write(
                json.dumps({"stage": name, "action": action, "fingerprint": fp, "time": time.time(), **extra})
                + "\n"
            )

    # -- per-iteration metrics --------------------------------------------------------------------
    def record(self, iteration: int, *artifacts: Artifact, **extra: Any) -> dict | None:
        """Write the metrics line of one iteration from its artifacts. metrics.jsonl is rewritten
        whole, keyed by iteration, so that a resumed run never duplicates a line."""
        if self.plan_only:
            done = {s.name for s in self.plan if s.state == "done"}
            if self.replay and all(a.name in done for a in artifacts):
                self._rows[iteration] = metrics_row(iteration, artifacts, extra)
            return None
        row = metrics_row(iteration, artifacts, extra)
        self._rows[iteration] = row
        write_jsonl(self.root / METRICS, self.metrics())
        if self.on_record is not None:
            self.on_record(row)
        return row

    def metrics(self) -> list[dict]:
        """The metrics lines: those recorded by this run over the whole ones it found."""
        return [self._rows[k] for k in sorted(self._rows)]


def metrics_row(iteration: int, artifacts: Iterable[Artifact], extra: dict) -> dict:
    row: dict[str, Any] = {"iteration": iteration}
    for artifact in artifacts:
        row.update(artifact.summary())
    row.update(extra)
    return row


def stage_state(path: Path, fp: str) -> tuple[str, str]:
    """A stage folder's state and, for changed and damaged, why."""
    marker = path / DONE
    if marker.exists():
        record, broken = read_marker(marker)
        if record is None:
            return "damaged", broken
        if record["fingerprint"] != fp:
            return "changed", f"done with other settings (fingerprint {record['fingerprint']}, now {fp})"
        broken = damage(path, record)
        return ("damaged", broken) if broken else ("done", "")
    if path.with_name(path.name + ".partial").exists() or path.exists():
        return "partial", ""
    return "pending", ""


@dataclass
class Iteration:
    run: Run
    index: int

    @property
    def prefix(self) -> str:
        return f"iter_{self.index:02d}"

    @property
    def seed(self) -> int:
        """This iteration's seed: distinct per iteration, fixed by the run's seed."""
        if self.run.seed is None:
            raise TypeError("this Run has no seed; pass Run(..., seed=...) (app.py sets cfg.seed)")
        return self.run.seed * 1000 + self.index

    def stage(self, name: str, fn: Callable, **inputs: Any) -> Artifact:
        """As :meth:`Run.stage`, under ``iter_NN/``, with this iteration's seed."""
        name = f"{self.prefix}/{name}"
        seed = self.seed if self.run.seed is not None else None
        return self.run._stage(name, fn, self.run.filled(name, fn, inputs, seed))
