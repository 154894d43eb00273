"""The model's tokenizer, with the chat template cut into a fixed header and a footer.

Document and question text is encoded with special tokens split, so a string
like `<|im_start|>` inside a document is plain text, never a control token. Only
the chat template's own text is parsed for special tokens.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_SENTINEL = "\u2063KVRAG_USER_TURN\u2063"


class ChatTokenizer:
    def __init__(self, path: Path | str):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> frozenset[int]:
        ids = {self.hf.eos_token_id}
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"):
            tid = self.hf.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.hf.unk_token_id:
                ids.add(tid)
        return frozenset(i for i in ids if i is not None)

    def encode_text(self, text: str) -> list[int]:
        """Untrusted text (documents, questions): special-token strings stay text."""
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.hf(
            text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
        )
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def _encode_template(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    @lru_cache(maxsize=8)  # noqa: B019 - a handful of system prompts per process
    def chat_frame(self, system: str) -> tuple[str, str]:
        """The chat template around one user turn: (text before it, text after it + assistant
        start)."""
        if self.hf.chat_template:
            for messages in (
                [{"role": "system", "content": system}, {"role": "user", "content": _SENTINEL}],
                [{"role": "user", "content": f"{system}\n\n{_SENTINEL}"}],
            ):
                try:
                    text = self.hf.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True
                    )
                except Exception:  # templates that reject a system role
                    continue
                before, after = text.split(_SENTINEL)
                return before, after
        bos = self.hf.bos_token or ""
        return f"{bos}System: {system}\nUser: ", "\nAssistant:"

    def header_ids(self, system: str, preamble: str) -> list[int]:
        before, _ = self.chat_frame(system)
        return self._encode_template(before) + self.encode_text(preamble)

    def footer_ids(self, system: str, question: str) -> list[int]:
        _, after = self.chat_frame(system)
        return self.encode_text(question) + self._encode_template(after)
