"""What `selfimprove plan <overrides>` prints for a run it would start: the stages and their states,
the settings that matter, the parameter count and the peak memory of each stage kind against the
hardware's (selfimprove/preflight.py computes them)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from selfimprove import preflight, tasks
from selfimprove.engine.pipeline import Run, plain
from selfimprove.memory import format_bytes
from selfimprove.training import launch

STATE_COLOURS = {
    "done": "green",
    "shared": "cyan",
    "pending": "white",
    "partial": "yellow",
    "changed": "red",
    "damaged": "magenta",
}


def model_line(cfg: DictConfig) -> str:
    model = plain(cfg.model)
    arch = preflight.arch_of(model)
    size = (
        f"{arch.parameters() / 1e9:.2f} B parameters" if arch else "parameters unknown (no config.json here)"
    )
    if arch and arch.parameters() < 1e8:
        size = f"{arch.parameters() / 1e6:.2f} M parameters"
    where = (
        model.get("name_or_path")
        or f"built locally ({model.get('architecture', 'llama')}, {model.get('tokenizer')})"
    )
    chat = preflight.chat_setting(model)
    prompts = {True: "chat template", False: "plain-text prompts", None: "chat template if it has one"}[chat]
    return f"{model['name']}: {where}, {size}, {prompts}"


def hardware_line(cfg: DictConfig) -> str:
    hw = plain(cfg.hardware)
    device = preflight.device_of(hw)
    memory = format_bytes(preflight.memory_of(hw))
    assumed = " (assumed: no GPU on this machine)" if device == "cuda" and not hw.get("memory_gb") else ""
    training = (
        f", training over {launch.processes(hw)} processes ({hw['accelerate']})"
        if hw.get("accelerate")
        else ""
    )
    return f"{hw['name']}: {device}, {hw['dtype']}, {memory} per device{assumed}{training}"


def setting_lines(cfg: DictConfig) -> list[tuple[str, str]]:
    """The method's training and sampling nodes, resolved: lr, batch split, lengths, LoRA, budgets."""
    rows = []
    hardware = plain(cfg.hardware)
    for key, node in plain(cfg.method).items():
        if not isinstance(node, dict):
            continue
        if {"steps", "lr", "batch_size"} <= set(node):
            micro, accumulation = launch.batch_split(node, hardware)
            lora = f"LoRA r={node['lora']['r']}" if node.get("lora") else "full fine-tuning"
            rows.append(
                (
                    f"method.{key}",
                    f"{node['steps']} steps, lr {node['lr']:g} ({node['lr_scheduler']}), batch {node['batch_size']} "
                    f"(micro {micro} x accumulation {accumulation} x {launch.processes(hardware)} device(s)), "
                    f"max_length {node['max_length']}, {lora}",
                )
            )
        elif {"n", "max_tokens", "temperature"} <= set(node):
            rows.append(
                (
                    f"method.{key}",
                    f"n {node['n']}, temperature {node['temperature']}, max_tokens {node['max_tokens']}",
                )
            )
        elif {"num_generations", "max_completion_length"} <= set(node):
            rows.append(
                (
                    f"method.{key}",
                    f"{node['num_generations']} completions per prompt, max {node['max_completion_length']} tokens, "
                    f"beta {node['beta']}, vLLM in the trainer: {node['use_vllm']}",
                )
            )
    return rows


def show(console, cfg: DictConfig, root: Path, planned: Run, notes: list[str]) -> None:
    """Print the plan of one run."""
    from rich.markup import escape
    from rich.table import Table

    done = sum(s.state == "done" for s in planned.plan)
    dataset = plain(cfg.dataset)
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]run directory[/]", f"{root}  ({done} of {len(planned.plan)} stages done)")
    head.add_row("[bold]model[/]", model_line(cfg))
    head.add_row(
        "[bold]dataset[/]",
        f"{tasks.label(dataset)}: prompts up to {dataset['prompt_tokens']} tokens, completions up to "
        f"{dataset['completion_tokens']} (sampling and evaluation)",
    )
    head.add_row("[bold]hardware[/]", hardware_line(cfg))
    head.add_row("[bold]generator[/]", str(getattr(cfg.generator.backend, "value", cfg.generator.backend)))
    for name, text in setting_lines(cfg):
        head.add_row(f"[bold]{name}[/]", escape(text))
    console.print(head)

    estimates = preflight.estimates(cfg, planned)
    memory = {stage: e for e in estimates for stage in e.stages}
    table = Table(title="stages")
    for col in ("stage", "state", "peak memory per device (estimate)"):
        table.add_column(col)
    shown = set()
    for s in planned.plan:
        estimate = memory.get(s.name)
        cell = ""
        if estimate is not None:
            cell = estimate.kind if id(estimate) in shown else f"{estimate.kind}: {estimate.line()}"
            shown.add(id(estimate))
        table.add_row(s.name, f"[{STATE_COLOURS[s.state]}]{s.state}[/]", cell)
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
