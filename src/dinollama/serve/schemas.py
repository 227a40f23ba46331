"""Request bodies of the OpenAI and llama.cpp routes, with the fields those clients send.

Unknown fields are accepted and ignored (editors send ``samplers``, ``n_indent``, ...); the types of
known fields are checked here, their ranges by :class:`~dinollama.codellama.SamplingParams`, the
same rules as the CLI.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI's limit on stop sequences


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class CompletionRequest(Body):
    """``POST /v1/completions``."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: str | None = Field(None, description="text after the completion: infilling (Code Llama 7B/13B)")
    max_tokens: int | None = Field(16, description="new tokens at most; null: the room left in the context")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, description="extension: sample from the k most likely tokens (0 = all)")
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stream: bool = False
    user: str | None = None


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict] | None = ""


class ChatRequest(Body):
    """``POST /v1/chat/completions``."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    user: str | None = None


class EmbeddingRequest(Body):
    """``POST /v1/embeddings``: images as ``data:image/...;base64,`` URLs with ``"modality": "image"``."""

    model: str | None = None
    input: str | list[str]
    modality: Literal["image", "text"] = "text"
    encoding_format: Literal["float", "base64"] = "float"
    patch_tokens: bool = Field(False, description="also return the patch tokens of each image")


class ExtraChunk(Body):
    text: str
    filename: str = "tmp"


class LlamaCompletionRequest(Body):
    """``POST /completion`` (llama.cpp's fields and defaults)."""

    prompt: str | list[int] = ""
    n_predict: int = Field(-1, description="-1: until a stop or the end of the context")
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    stop: list[str] = Field(default_factory=list)
    seed: int = Field(-1, description="-1: a random seed")
    stream: bool = False
    cache_prompt: bool = True
    t_max_predict_ms: int = Field(0, ge=0, description="time limit for the generation, 0 = none")
    n_probs: int = Field(0, ge=0, le=20)
    response_fields: list[str] = Field(default_factory=list)


class InfillRequest(LlamaCompletionRequest):
    """``POST /infill``: what llama.vim and llama.vscode send."""

    prompt: str = ""
    input_prefix: str
    input_suffix: str
    input_extra: list[ExtraChunk] = Field(default_factory=list)


class TokenizeRequest(Body):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(Body):
    tokens: list[int]
