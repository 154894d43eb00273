"""A llama-index NodeParser over kvrag's chunkers (Meta-Chunking and the baselines),
exact offsets kept.

    parser = MetaChunkingNodeParser.from_name("meta-ppl", chunk_size=150)
    nodes = parser.get_nodes_from_documents([Document(text=...)])

Each node's start_char_idx/end_char_idx are the chunker's own span: llama-index
would otherwise re-find every chunk by a text search, which lands on the wrong
copy of repeated text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.node_parser import NodeParser
from llama_index.core.node_parser.node_utils import build_nodes_from_splits
from llama_index.core.schema import BaseNode, Document, MetadataMode
from llama_index.core.utils import get_tqdm_iterable
from pydantic import Field, PrivateAttr


class MetaChunkingNodeParser(NodeParser):
    """Splits nodes with a kvrag chunker (any `ingest.chunkers.Chunker`)."""

    chunker_name: str = Field(default="meta-ppl", description="kvrag chunker name")
    _chunker: Any = PrivateAttr()

    def __init__(self, chunker: Any, **kwargs: Any):
        super().__init__(chunker_name=getattr(chunker, "name", "custom"), **kwargs)
        self._chunker = chunker

    @classmethod
    def from_name(
        cls,
        name: str = "meta-ppl",
        chunk_size: int = 200,
        settings=None,
        resources=None,
        **options: Any,
    ) -> MetaChunkingNodeParser:
        from ingest.chunkers import Resources, make_chunker
        from rag.config import Settings

        resources = resources or Resources(settings or Settings())
        return cls(make_chunker(name, resources, chunk_size, **options))

    @classmethod
    def class_name(cls) -> str:
        return "MetaChunkingNodeParser"

    def _parse_nodes(
        self, nodes: Sequence[BaseNode], show_progress: bool = False, **kwargs: Any
    ) -> list[BaseNode]:
        out: list[BaseNode] = []
        for node in get_tqdm_iterable(nodes, show_progress, "Chunking"):
            text = node.get_content(metadata_mode=MetadataMode.NONE)
            spans = self._chunker.split(text)
            built = build_nodes_from_splits(
                [text[s:e] for s, e in spans], node, id_func=self.id_func
            )
            for n, (s, e) in zip(built, spans, strict=True):
                n.start_char_idx, n.end_char_idx = s, e
            out.extend(built)
        return out

    def _postprocess_parsed_nodes(
        self, nodes: list[BaseNode], parent_doc_map: dict[str, Document]
    ) -> list[BaseNode]:
        spans = [
            (getattr(n, "start_char_idx", None), getattr(n, "end_char_idx", None)) for n in nodes
        ]
        nodes = super()._postprocess_parsed_nodes(nodes, parent_doc_map)
        for n, (s, e) in zip(
            nodes, spans, strict=True
        ):  # keep our exact offsets, not a text search
            if s is not None:
                n.start_char_idx, n.end_char_idx = s, e
        return nodes
