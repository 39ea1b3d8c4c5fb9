"""Chat templates (generation and SFT) and LoRA, on a tiny local model whose tokenizer has a chat
template -- built here, no download."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from selfimprove.engine.pipeline import Run, stage, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import sample
from selfimprove.methods.tt_si.testtime import answer, completion_rows, lora_model
from selfimprove.models import build_tiny, chat_prompt, init_model, load_model, model_meta
from selfimprove.training.sft import sft, sft_rows
from tests.conftest import compose_cfg

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HARDWARE = {"device": "cpu", "dtype": "float32", "num_threads": None, "name": "cpu"}
GEN = {"backend": "hf", "batch_size": 64}
GREEDY = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 6, "stop": []}
RECORDS = [{"id": f"p{i}", "prompt": f"{i}+{i}", "answer": "yes", "meta": {}} for i in range(40)]


def train_cfg(**changes):
    cfg = {**dict(compose_cfg([]).method.train), "steps": 20, "batch_size": 8, "lr": 1e-2}
    cfg["lr_scheduler"] = "constant"
    return {**cfg, **changes}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A run directory whose init stage references a local tiny model with a chat template
    (model=hub with a local path, chat_template=auto), plus gold data "<prompt>" -> "yes"."""
    tmp = tmp_path_factory.mktemp("chat")
    model_cfg = {**dict(compose_cfg([]).model), "intermediate_size": 128}
    build_tiny(model_cfg, tmp / "local", seed=0)
    tok = AutoTokenizer.from_pretrained(tmp / "local" / "model")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp / "local" / "model")
    hub = dict(compose_cfg(["model=hub", f"model.name_or_path={tmp / 'local' / 'model'}"]).model)
    (tmp / "data").mkdir()
    write_jsonl(tmp / "data" / "train.jsonl", [{**r, "completion": "yes"} for r in RECORDS])
    return tmp, hub


def test_sft_rows_are_conversational_and_loss_covers_only_the_answer(chat_run):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tmp, _ = chat_run
    lm, tok = load_model(tmp / "local", HARDWARE)
    records = [{"prompt": "2+2", "completion": "yes"}]
    args = SFTConfig(output_dir=str(tmp / "t"), use_cpu=True, bf16=False, report_to="none", max_length=64)
    for chat, expected_text in ((True, "<|user|>2+2</s><|assistant|>yes</s>"), (False, "2+2yes</s>")):
        trainer = SFTTrainer(
            model=lm,
            args=args,
            train_dataset=Dataset.from_list(sft_rows(records, chat)),
            processing_class=tok,
        )
        row = trainer.train_dataset[0]
        assert tok.decode(row["input_ids"]).replace("<s>", "") == expected_text
        answer = [t for t in row["labels"] if t != -100]  # TRL 1.16 masks the prompt with -100
        assert tok.decode(answer) == "yes</s>"  # completion-only loss, also through the chat template
    # the prompt generation uses is exactly the prompt part SFT trained on
    assert chat_prompt(tok, "2+2") == "<|user|>2+2</s><|assistant|>"


def test_chat_sft_then_lora_adapter_generate_and_continue(chat_run):
    tmp, hub = chat_run
    with Run(tmp / "run", log=lambda _: None) as run:
        init = run.stage("init", init_model, model=hub, seed=0)
        data = run.stage("data", _copy_data, source=str(tmp / "data"))
        full = run.stage("full", sft, model=init, data=data, train=train_cfg(), hardware=HARDWARE, seed=0)
        lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
        adapted = run.stage(
            "lora", sft, model=full, data=data, train=train_cfg(steps=4, lora=lora), hardware=HARDWARE, seed=0
        )
        again = run.stage(
            "lora2",
            sft,
            model=adapted,
            data=data,
            train=train_cfg(steps=2, lora=lora),
            hardware=HARDWARE,
            seed=0,
        )
    # generation wraps the prompt in the chat template: the model answers as it was trained
    for artifact in (full, adapted, again):
        outs = sample(artifact, RECORDS[:4], GREEDY, GEN, HARDWARE, seed=0)
        assert [o["completion"] for o in outs] == ["yes"] * 4, artifact.name
    # TT-SI's own LoRA loop trains on the text SFT trained on and answers through the template too
    # (a fresh adapter changes nothing)
    adapt = {"rank": 4, "alpha": 8, "target_modules": "all-linear", "lr": 1e-2, "steps": 0}
    peft_lm, tok, _ = lora_model(full, adapt, HARDWARE)
    ((ids, labels),) = completion_rows(tok, model_meta(full), [{"prompt": "2+2", "completion": "yes"}])
    assert tok.decode(ids).replace("<s>", "") == "<|user|>2+2</s><|assistant|>yes</s>"  # as SFT's row
    assert tok.decode([t for t in labels if t != -100]) == "yes</s>"
    assert answer(peft_lm, tok, model_meta(full), RECORDS[:4], 6) == ["yes"] * 4
    # a LoRA stage saves a PEFT adapter folder (not full weights) that names its base artifact
    assert (adapted.path / "model" / "adapter_config.json").exists()
    assert not (adapted.path / "model" / "model.safetensors").exists()
    assert (adapted.path / "model_meta.json").read_text().count("adapter_base") == 1
    merged, _ = load_model(again, HARDWARE)
    assert not hasattr(merged, "peft_config")  # adapters are merged on load: a plain model


@stage(name="copy_data")
def _copy_data(out, source: str) -> dict:
    import shutil

    shutil.copy(f"{source}/train.jsonl", out / "train.jsonl")
    return {}


def test_chat_template_true_without_one_is_a_config_error(tmp_path):
    model_cfg = {**dict(compose_cfg([]).model), "intermediate_size": 128}
    build_tiny(model_cfg, tmp_path / "plain", seed=0)
    hub = dict(
        compose_cfg(
            ["model=hub", f"model.name_or_path={tmp_path / 'plain' / 'model'}", "model.chat_template=true"]
        ).model
    )
    with Run(tmp_path / "run", log=lambda _: None) as run:
        init = run.stage("init", init_model, model=hub, seed=0)
    with pytest.raises(ConfigError, match="chat_template=true but the tokenizer has no chat template"):
        sample(init, RECORDS[:1], GREEDY, GEN, HARDWARE, seed=0)
    with pytest.raises(ConfigError, match="model.chat_template='sometimes'"):
        with Run(tmp_path / "run2", log=lambda _: None) as run:
            run.stage("init", init_model, model={**hub, "chat_template": "sometimes"}, seed=0)


def test_lora_override_from_the_command_line():
    from selfimprove.engine.pipeline import plain
    from selfimprove.training.sft import lora_config

    cfg = compose_cfg(
        ["method.train.lora={r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}"]
    )
    config = lora_config(plain(cfg.method.train)["lora"])
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (8, 16, ["q_proj", "v_proj"])
    assert lora_config(plain(compose_cfg([]).method.train)["lora"]) is None
    with pytest.raises(ConfigError, match="must have exactly the keys alpha, dropout, r, target_modules"):
        lora_config(plain(compose_cfg(["method.train.lora={r: 8}"]).method.train)["lora"])
