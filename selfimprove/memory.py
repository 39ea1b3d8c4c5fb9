"""Peak memory per device of a stage, estimated from the model's shape (no model is loaded).

``selfimprove plan`` prints these numbers per stage kind and refuses a run that cannot fit. The
estimate models what this project's code does -- TRL 1.16 trainers on a transformers 5 Llama/Qwen2
model loaded in ``hardware.dtype`` and trained by torch's fused AdamW -- not a textbook setup:

* weights, gradients and the two AdamW states are all in the parameter dtype (2+2+4 = 8 bytes per
  parameter in bfloat16, 16 in float32); DeepSpeed ZeRO-3 with bf16 keeps fp32 master weights and
  fp32 Adam states instead (2+2+12 = 16 bytes per parameter, Rajbhandari et al. 2020 §3.1); FSDP
  and ZeRO-3 divide them by the number of processes;
* activations are what a decoder layer saves for backward, derived term by term in
  :func:`layer_activation_bytes` and checked tensor by tensor against autograd's saved tensors;
* TRL 1.16 never materialises the ``[tokens, vocab]`` logits: its fused LM head
  (``trl.kernels.chunked_logprob``) projects [4096 tokens x 32768 vocab] tiles and accumulates the
  LM-head gradient in float32; without Triton (CPU) each tile is folded by ~8 float32 temporaries;
* the allocator keeps memory beyond the live tensors (glibc malloc on CPU, measured; PyTorch's
  caching allocator and the CUDA context on GPUs, assumed).

All sizes are bytes. docs/memory.md compares the estimate with measured peaks and published figures.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP32 = 4  # bytes of a float32
PAGE = 4096  # bytes of a memory page (CPU resident memory grows by pages)
# TRL 1.16 fused LM head (trl/kernels/chunked_logprob.py): tokens and vocabulary columns per tile
HEAD_TILE_TOKENS = 4096
HEAD_TILE_VOCAB = 32768
# float32 tile-sized temporaries alive at once in the torch (no-Triton) backward of that head:
# y, z, log_p, p, grad, is_target.float(), and two for `grad += g * (is_target - p)` (7.4 profiled)
HEAD_TILE_TEMPORARIES_CPU = 8
# allocator memory beyond live tensors, as a fraction of the saved activations (allocator_overhead)
CPU_ALLOCATOR_OVERHEAD = 0.6  # measured 0.46-0.61 (docs/memory.md)
CUDA_ALLOCATOR_OVERHEAD = 0.1  # assumed, not measured here
CUDA_CONTEXT = 2**30  # bytes the CUDA context and library workspaces take outside PyTorch (assumed)


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only Llama/Qwen2-style transformer: all the estimate needs to know."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    context: int
    o_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj (Qwen2 has none there)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: kv heads x head_dim."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config) -> Arch:
        """From a transformers LlamaConfig / Qwen2Config (Qwen2 always has q/k/v biases)."""
        qwen2 = config.model_type == "qwen2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        if getattr(config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not modelled (no Llama/Qwen2 checkpoint uses it)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if head_dim * heads != config.hidden_size:
            raise ValueError(f"head_dim {head_dim} x {heads} heads != hidden_size {config.hidden_size}")
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tied_embeddings=bool(config.tie_word_embeddings),
            qkv_bias=qwen2 or attention_bias,
            context=config.max_position_embeddings,
            o_bias=attention_bias and not qwen2,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of one decoder layer."""
        h, kv, i = self.hidden_size, self.kv_dim, self.intermediate_size
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_parameters(self) -> int:
        """One decoder layer: the seven linears, their biases, and two RMSNorm weights."""
        weights = sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes().values())
        biases = (self.hidden_size + 2 * self.kv_dim) * self.qkv_bias + self.hidden_size * self.o_bias
        return weights + biases + 2 * self.hidden_size

    def embedding_parameters(self) -> int:
        """Input embeddings plus the LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def parameters(self) -> int:
        """Exact parameter count: embeddings, LM head unless tied, layers, final RMSNorm."""
        return self.embedding_parameters() + self.num_layers * self.layer_parameters() + self.hidden_size


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a hardware.dtype name."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def lora_targets(target_modules: str | list[str] | tuple[str, ...]) -> list[str]:
    """peft's "all-linear" (every linear of every layer, never the LM head) or a list of names."""
    if target_modules == "all-linear":
        return list(LINEAR_MODULES)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = sorted(set(names) - set(LINEAR_MODULES))
    if unknown:
        raise ValueError(f"LoRA target_modules {unknown} are not linears of a Llama/Qwen2 layer")
    return names


def lora_parameters(arch: Arch, r: int, target_modules: str | list[str] = "all-linear") -> int:
    """Trainable parameters of a LoRA adapter: A (r x in) and B (out x r) per targeted linear."""
    shapes = arch.linear_shapes()
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) for m in lora_targets(target_modules))
    return arch.num_layers * per_layer


def layer_activation_bytes(arch: Arch, seq_len: int, dtype: str, scores: bool) -> int:
    """Bytes one token leaves saved for backward in one decoder layer (transformers 5 Llama/Qwen2).

    b = bytes of dtype, h = hidden, kv = key/value width, i = intermediate, a = heads:
      RMSNorm x2: its input as float32 (the fp32 copy under bf16, the residual itself under fp32:
                  4h), the normalised input (bh, for the weight grad) and its output (bh, input of
                  the next linears)                                          2 x (4h + 2bh)
      attention:  rotary q and k, v (bh + 2b kv); when kv < h, repeat_kv's copies of k and v, made
                  whenever a padding mask is passed (2b(h - kv)); SDPA's output, which is also
                  o_proj's input (flash kernels write it [batch, seq, heads, head_dim], so the
                  transpose back is free), and its log-sum-exp (bh + 4a). q and k before rotary
                  are not saved (the rotary muls save cos/sin only).
      attention scores, only when materialised (eager attention, SDPA's math path): softmax
                  probabilities in float32 and their cast to dtype         a x seq_len x (4 [+ b])
      MLP:        gate, SiLU(gate), up, SiLU(gate) * up                       4bi
    """
    h, kv, i, a = arch.hidden_size, arch.kv_dim, arch.intermediate_size, arch.num_heads
    b = dtype_bytes(dtype)
    norms = 2 * (FP32 * h + 2 * b * h)
    attention = b * (h + 2 * kv) + 2 * b * (h - kv) + b * h + FP32 * a
    probabilities = a * seq_len * (FP32 + (b if b != FP32 else 0)) if scores else 0
    mlp = 4 * b * i
    return norms + attention + probabilities + mlp


def lora_layer_activation_bytes(arch: Arch, dtype: str, r: int, target_modules) -> int:
    """Extra bytes per token per layer that LoRA saves: per targeted linear, peft casts the input to
    the adapter's float32 and drops it out (the fp32 dropout output, 4 x in, and its mask, in bytes)
    and lora_A's output (4r) is saved for lora_B."""
    shapes = arch.linear_shapes()
    return sum((FP32 + 1) * shapes[m][0] + FP32 * r for m in lora_targets(target_modules))


def head_saved_bytes(arch: Arch, dtype: str) -> int:
    """Bytes per token saved outside the layers: the final RMSNorm's float32 input and normalised
    input (4h + bh) and the copy of its output, less the last position, that TRL's fused head keeps
    (bh); the norm's output itself is not kept."""
    b = dtype_bytes(dtype)
    return FP32 * arch.hidden_size + 2 * b * arch.hidden_size


def uses_attention_scores(attention: str | None) -> bool:
    """Whether attention materialises the [heads, seq, seq] probabilities. transformers defaults to
    SDPA, which runs a flash kernel on CUDA and on CPU as well (torch 2.13 dispatches training on
    CPU, with or without a mask, to _scaled_dot_product_flash_attention_for_cpu, checked with the
    profiler), so only "eager" (or SDPA forced onto its "math" path) does."""
    return (attention or "sdpa") in ("eager", "math")


def head_tile_bytes(arch: Arch, tokens: int, dtype: str, device: str) -> int:
    """The fused head's projection buffer: ``torch.empty(min(tokens, 4096), 32768)`` in dtype, of
    which each row uses only min(vocab, 32768) columns. A GPU allocator commits all of it; on CPU
    only the touched pages become resident (each row's used bytes plus one page of misalignment)."""
    rows = min(tokens, HEAD_TILE_TOKENS)
    b = dtype_bytes(dtype)
    if device != "cpu":
        return rows * HEAD_TILE_VOCAB * b
    used = min(arch.vocab_size, HEAD_TILE_VOCAB) * b
    return rows * (-(-used // PAGE) + 1) * PAGE


def logits_bytes(
    arch: Arch, tokens: int, dtype: str, device: str, fused_lm_head: bool = True, head_grad: bool = True
) -> int:
    """Peak bytes of the LM head and loss for ``tokens`` scored tokens, during the backward.

    fused (TRL 1.16, every trainer here): the projection buffer (:func:`head_tile_bytes`); when
    folded by torch ops (no Triton: CPU) ~7 float32 temporaries of one [4096, vocab] tile; the
    float32 accumulators of the hidden-state gradient (4h per token) and, when the LM head is
    trained and dtype is not float32, of its weight gradient (4 x vocab x h; in float32 it *is* the
    gradient). Unfused (the plain transformers loss): the logits in dtype, their float32 copy (when
    dtype is not float32), log-softmax and its gradient in float32.
    """
    b = dtype_bytes(dtype)
    v, h = arch.vocab_size, arch.hidden_size
    if not fused_lm_head:
        return tokens * v * (b + (FP32 if b != FP32 else 0) + 2 * FP32)
    temporaries = HEAD_TILE_TEMPORARIES_CPU if device == "cpu" else 0
    tile_fp32 = min(tokens, HEAD_TILE_TOKENS) * min(v, HEAD_TILE_VOCAB) * FP32
    weight_grad_fp32 = FP32 * v * h if head_grad and b != FP32 else 0
    return (
        head_tile_bytes(arch, tokens, dtype, device)
        + temporaries * tile_fp32
        + FP32 * h * tokens
        + weight_grad_fp32
    )


def state_bytes_per_parameter(dtype: str, sharding: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per trained parameter before sharding."""
    b = dtype_bytes(dtype)
    if sharding == "zero3" and b != FP32:
        # ZeRO mixed precision: 16-bit weights and gradients, fp32 master weights + two Adam states
        return b, b, 3 * FP32
    return b, b, 2 * b  # torch AdamW: exp_avg and exp_avg_sq like the parameter


def gathered_parameters(arch: Arch, sharding: str) -> int:
    """Parameters a sharded process holds unsharded at once: two decoder layers (the one computing
    and the one prefetched) and the embeddings and LM head: FSDP2 does not reshard its root unit
    after forward, and TRL's fused head gathers the LM head in full under FSDP and ZeRO-3 alike."""
    if sharding == "none":
        return 0
    return 2 * arch.layer_parameters() + arch.embedding_parameters() + arch.hidden_size


def sequences_per_step(trainer: str, micro_batch: int) -> int:
    """Sequences in one forward: DPO concatenates chosen and rejected of each pair."""
    if trainer not in ("sft", "dpo", "grpo"):
        raise ValueError(f"trainer {trainer!r} is not one of sft, dpo, grpo")
    return 2 * micro_batch if trainer == "dpo" else micro_batch


def activation_bytes(arch: Arch, tokens: int, dtype: str, layer: int, gradient_checkpointing: bool) -> int:
    """What the forward leaves saved for backward: ``layer`` bytes per token in every layer (with
    gradient checkpointing only each layer's input, b x hidden) plus the LM head's inputs."""
    kept = dtype_bytes(dtype) * arch.hidden_size if gradient_checkpointing else layer
    return tokens * (arch.num_layers * kept + head_saved_bytes(arch, dtype))


def allocator_overhead(activations: int, device: str) -> int:
    """Memory held beyond live tensors. CPU (glibc malloc): after the first large free the mmap
    threshold rises (up to 32 MB), so activation-sized tensors then come from the heap, whose freed
    blocks stay resident: 0.46-0.61 x the saved activations, measured as the difference between
    scripts/bench_memory.py with and without MALLOC_MMAP_THRESHOLD_ (docs/memory.md). CUDA (not
    measured here): the caching allocator's rounding and split blocks, assumed 0.1 x, plus the
    CUDA context and library workspaces (CUDA_CONTEXT)."""
    if device == "cpu":
        return int(CPU_ALLOCATOR_OVERHEAD * activations)
    return int(CUDA_ALLOCATOR_OVERHEAD * activations) + CUDA_CONTEXT


def trained_states(
    arch: Arch, dtype: str, sharding: str, shards: int, lora: dict | None
) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per device. LoRA: the frozen base in dtype, the
    adapter's weights, gradients and two AdamW states in float32 (peft's default)."""
    b = dtype_bytes(dtype)
    base = arch.parameters()
    gathered = gathered_parameters(arch, sharding) if shards > 1 else 0  # one process: nothing to gather
    if lora:
        adapter = lora_parameters(arch, lora["r"], lora.get("target_modules", "all-linear"))
        return base * b // shards + gathered * b + FP32 * adapter, FP32 * adapter, 2 * FP32 * adapter
    weight_b, grad_b, optim_b = state_bytes_per_parameter(dtype, sharding)
    return (
        base * weight_b // shards + gathered * b,
        base * grad_b // shards + gathered * b,
        base * optim_b // shards,
    )


def training_peak(
    arch: Arch,
    *,
    trainer: str,
    micro_batch: int,
    seq_len: int,
    dtype: str,
    device: str,
    processes: int = 1,
    sharding: str = "none",
    gradient_checkpointing: bool = False,
    lora: dict | None = None,
    reference_model: bool = False,
    attention: str | None = None,
    fused_lm_head: bool = True,
    generation_batch: int | None = None,
) -> dict[str, int]:
    """Peak bytes per device of one training step, by component, and their ``total``.

    ``micro_batch``: examples per device per forward (pairs for DPO, completions for GRPO), each
    ``seq_len`` tokens long. ``lora``: {"r", "target_modules"} (others ignored). ``reference_model``:
    a frozen copy of the model (DPO without LoRA always has one; GRPO when its KL beta > 0).
    ``sharding``: none | fsdp | zero3 over ``processes``. ``attention``: None/"sdpa" (flash kernels,
    no score matrix) | "eager". GRPO also generates its completions with the model (HF generate,
    ``generation_batch`` sequences at once, default ``micro_batch``; 0 = vLLM does it).

    The components are not all alive at once. Weights, optimizer state and the reference always
    are; on top of them the peak is the largest of: the start of the backward (all saved
    ``activations`` plus the LM head's ``logits`` transients), its end (all ``gradients`` plus two
    layers' activations: the one back-propagated and its transients) and GRPO's ``generation``.
    ``overhead`` is the allocator's (:func:`allocator_overhead`).
    """
    if sharding not in ("none", "fsdp", "zero3"):
        raise ValueError(f"sharding {sharding!r} is not one of none, fsdp, zero3")
    shards = processes if sharding != "none" else 1
    sequences = sequences_per_step(trainer, micro_batch)
    tokens = sequences * seq_len
    weights, gradients, optimizer = trained_states(arch, dtype, sharding, shards, lora)
    copy_of_model = reference_model or (trainer == "dpo" and not lora)
    reference = arch.parameters() * dtype_bytes(dtype) // shards if copy_of_model else 0

    layer = layer_activation_bytes(arch, seq_len, dtype, uses_attention_scores(attention))
    if lora:
        layer += lora_layer_activation_bytes(arch, dtype, lora["r"], lora.get("target_modules", "all-linear"))
    activations = activation_bytes(arch, tokens, dtype, layer, gradient_checkpointing)
    scored_tokens = sequences * max(seq_len - 1, 1)
    logits = logits_bytes(arch, scored_tokens, dtype, device, fused_lm_head, head_grad=not lora)
    generation = 0
    if trainer == "grpo":
        batch = micro_batch if generation_batch is None else generation_batch
        generation = generation_bytes(arch, batch, seq_len, dtype) if batch else 0

    backward_start = activations + logits + (tokens * layer if gradient_checkpointing else 0)
    backward_end = gradients + 2 * tokens * layer + (activations if gradient_checkpointing else 0)
    overhead = allocator_overhead(activations, device)
    total = weights + optimizer + reference + max(backward_start, backward_end, generation) + overhead
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
        "reference": reference,
        "generation": generation,
        "overhead": overhead,
        "total": total,
    }


def kv_cache_bytes(arch: Arch, tokens: int, dtype: str) -> int:
    """Keys and values of every layer: 2 x layers x kv_heads x head_dim x bytes per token."""
    return 2 * arch.num_layers * arch.kv_dim * dtype_bytes(dtype) * tokens


def step_logits_bytes(arch: Arch, sequences: int) -> int:
    """The last position's logits of one decoding step, in float32 (generate upcasts them), with
    the processed copy the sampler makes."""
    return 2 * FP32 * sequences * arch.vocab_size


def prefill_bytes(arch: Arch, tokens: int, dtype: str) -> int:
    """The widest moment of a no-grad forward over ``tokens`` prompt tokens: one layer's MLP
    (gate, up and SiLU(gate) alive together, 3bi) and attention (q, k, v, output: ~4bh) per token."""
    b = dtype_bytes(dtype)
    return tokens * b * (3 * arch.intermediate_size + 4 * arch.hidden_size)


def generation_bytes(
    arch: Arch, sequences: int, seq_len: int, dtype: str, prompt_len: int | None = None
) -> int:
    """Memory of HF generation on top of the weights: the KV cache at full length plus the larger
    of the prompt's prefill and one decoding step's logits."""
    prompt = seq_len if prompt_len is None else prompt_len
    transient = max(prefill_bytes(arch, sequences * prompt, dtype), step_logits_bytes(arch, sequences))
    return kv_cache_bytes(arch, sequences * seq_len, dtype) + transient


def generation_peak(
    arch: Arch, *, sequences: int, seq_len: int, dtype: str, engine: str = "hf", prompt_len: int | None = None
) -> dict[str, int]:
    """Peak bytes of generating ``sequences`` sequences of ``seq_len`` tokens (prompt + completion).

    hf: weights, the KV cache of every sequence and the larger of the prefill of their prompts
    (``prompt_len`` tokens each; default seq_len, an upper bound) and one step's logits. vllm: the
    minimum vLLM needs -- weights and one full-length sequence's KV cache; it pre-allocates the rest
    of its share (gpu_memory_utilization or kv_cache_memory_bytes) for more sequences at once.
    """
    weights = arch.parameters() * dtype_bytes(dtype)
    if engine == "vllm":
        kv_cache, transient = kv_cache_bytes(arch, seq_len, dtype), 0
    elif engine == "hf":
        kv_cache = kv_cache_bytes(arch, sequences * seq_len, dtype)
        transient = generation_bytes(arch, sequences, seq_len, dtype, prompt_len) - kv_cache
    else:
        raise ValueError(f"engine {engine!r} is not one of hf, vllm")
    return {
        "weights": weights,
        "kv_cache": kv_cache,
        "transient": transient,
        "total": weights + kv_cache + transient,
    }


def format_bytes(n: float) -> str:
    """Bytes for people, in decimal units as GPU makers quote them: "15.2 GB", "412 MB"."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} B"
