"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has one).

Every size a client controls is bounded here, so a bad body is a clear 400 from
validation rather than an out-of-memory or a 500 deep in the engine. The bounds
are in the OpenAPI schema too (clients and schemathesis see them).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from rag.conversation import Conversation

MAX_BODY_BYTES = 1 << 20  # JSON bodies
MAX_UPLOAD_BYTES = 20 << 20  # POST /v1/documents (a file, multipart)
MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 32_000
MAX_QUERY_CHARS = 4_000
MAX_TOKENS = 2048
MAX_K = 16
MAX_STOP = 4
MAX_STOP_CHARS = 64

Mode = Literal["full", "reuse", "blend"]
Text = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]


class Strict(BaseModel):
    # NaN/inf would slip past ge/le bounds (every comparison with NaN is false).
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")  # name, tool_calls, ...
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=16)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class KvragOptions(Strict):
    """The non-OpenAI knobs, in the body's `kvrag` field."""

    k: int | None = Field(None, ge=1, le=MAX_K, description="chunks to retrieve")
    mode: Mode | None = Field(None, description="how the prompt's K/V is built")
    ratio: float | None = Field(None, ge=0.0, le=1.0, description="blend recompute fraction")


class StreamOptions(Strict):
    include_usage: bool = False


Stop = (
    Annotated[str, Field(max_length=MAX_STOP_CHARS)]
    | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)]
    | None
)


class SamplingRequest(Strict):
    """What chat and legacy completions share: the model, the sampling, the stream."""

    # OpenAI clients send many optional fields this server ignores (presence_penalty, user, ...).
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    model: str = Field("", max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Stop = None
    n: int = Field(1, ge=1, le=128, description="only n=1 is supported (400 otherwise)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(
        False,
        description="generate max_tokens even past the end token (vLLM's field, for benchmarks)",
    )
    kvrag: KvragOptions | None = None

    @field_validator("temperature", "top_p", "n", "stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_default(cls, value: object, info: ValidationInfo) -> object:
        # OpenAI accepts null for these (clients send it for "unset").
        return cls.model_fields[info.field_name].default if value is None else value

    def stop_list(self) -> list[str] | None:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s] or None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    # Accepted only to refuse them clearly (rag/server/openai_shapes.py): kvrag answers text.
    tools: list[dict] | None = Field(None, max_length=128)
    functions: list[dict] | None = Field(None, max_length=128)
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None

    def question(self) -> str:
        """The last user message: the question asked."""
        return self.conversation().question

    def conversation(self) -> Conversation:
        return Conversation.from_messages([(m.role, m.text()) for m in self.messages])


class CompletionRequest(SamplingRequest):
    """POST /v1/completions (legacy): the prompt is the question."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    best_of: int | None = Field(None, ge=1, le=128)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class RetrieveRequest(Strict):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int | None = Field(None, ge=1, le=MAX_K)


class DocumentText(Strict):
    """A document sent as JSON text (a file goes as multipart instead)."""

    text: str = Field(min_length=1, max_length=MAX_UPLOAD_BYTES)
    name: str | None = Field(
        None, max_length=200, description="file name to store it under (.txt/.md)"
    )


# -- responses (documentation; the handlers build plain dicts) ---------------------


class Citation(BaseModel):
    doc_id: str
    start: int
    end: int
    score: float = Field(
        description="retrieval score: the fused rank score (hybrid) or the cosine (dense)"
    )
    chunk_id: int


class KvragInfo(BaseModel):
    mode: str
    citations: list[Citation]
    timings_ms: dict[str, float]
    cache: dict[str, int | dict[str, dict[str, int]]]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    kvrag: KvragInfo


class RetrievedChunk(Citation):
    text: str


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[RetrievedChunk]
    timings_ms: dict[str, float]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
