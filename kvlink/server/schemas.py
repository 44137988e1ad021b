"""The REST app's request and response models (pydantic): what its OpenAPI document (/openapi.json,
/docs) describes, field by field. kvlink/server/rest.py fills them from kvlink.metrics and the session store."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: str = Field(description='"serving", or "stopping" once shutdown began (then HTTP 503)')


class Info(BaseModel):
    status: str = Field(description='"serving" or "stopping"')
    model: str = Field(description="display name of the receiver's model")
    fingerprint: str = Field(description="model + tokenizer fingerprint senders must match")
    device: str
    uptime_s: float
    identity: str = Field(description="who is asking (kvlink.server.guard)")
    operator: bool = Field(description="whether the caller sees every identity's records")
    auth: str = Field(
        description='how identities are told apart: "tenants", "token", "certificates" or "none"'
    )
    sessions: int = Field(description="the caller's sessions with contexts held")
    cached_messages: int
    cached_bytes: int


class Bytes(BaseModel):
    """Wire bytes by category (gRPC prefixes included)."""

    payload: int = Field(description="quantized codes")
    metadata: int = Field(description="positions + scales/zero points + low-rank factors")
    positions: int
    scales: int
    factors: int
    framing: int = Field(description="every other byte of the frames")
    signaling: int = Field(description="acks, nacks and the receipt")
    total: int


class Timing(BaseModel):
    n: int
    mean: float | None
    p50: float | None
    p95: float | None


class Group(BaseModel):
    """Aggregates over a group of messages (one codec config, or one context-length bucket)."""

    config: dict[str, Any] = Field(description="the codec config (of the group's latest message)")
    messages: int
    questions: int
    bytes: dict[str, int]
    bytes_per_message: dict[str, float]
    fp16_bytes: int = Field(description="FP16 size of the full context KV, summed")
    percent_of_fp16: float | None
    compression_ratio: float | None
    retransmits: int
    timings: dict[str, Timing] = Field(description="seconds per stage, sender's and receiver's")
    scored_questions: int = Field(description="questions asked with reference answers")
    f1_mean: float | None
    exact_match_mean: float | None


class StoreView(BaseModel):
    sessions: int
    messages: int
    bytes: int
    peak_bytes: int | None = Field(None, description="operators only, as the fields below")
    max_bytes: int | None = None
    ttl_s: float | None = None
    evicted: int | None = None
    expired: int | None = None
    reserved_bytes: int | None = None
    refused_busy: int | None = None


class Stats(BaseModel):
    messages: int
    questions: int
    bytes: dict[str, int] = Field(description="payload, metadata, framing, signaling and total")
    fp16_bytes: int
    compression_ratio: float | None
    errors: dict[str, int] = Field(description="refusals by kvlink error code")
    records_held: int
    configs: dict[str, Group] = Field(description="per codec config label")
    lengths: dict[str, Group] = Field(description="per context-length bucket ('1-256', '257-512', ...)")
    store: StoreView
    calls: dict[str, int | float | None] | None = Field(
        None, description="calls in progress (operators only)"
    )
    memory: dict[str, Any] | None = Field(
        None, description="the receiver's host and device memory and their peaks (operators only)"
    )
    fleet: dict[str, Any] | None = Field(
        None,
        description="?scope=fleet: every replica's messages from the shared store (kvlink.server.shared)",
    )


class Limits(BaseModel):
    """What the receiver accepts and holds (kvlink-serve's limit flags). The receiver-wide caps are an
    operator's to see; other callers get null there, and the limits that bind them."""

    max_message_bytes: int = Field(description="largest message (declared chunk data + positions)")
    max_chunk_bytes: int
    max_context_tokens: int = Field(description="longest context T (at most the model's positions)")
    max_new_tokens: int = Field(description="longest answer (longer requests are clamped)")
    max_question_tokens: int
    max_references: int = Field(description="reference answers per question")
    per_peer_concurrency: int = Field(description="Transfer and Ask calls in progress from one sender")
    stall_timeout_s: float | None = Field(description="longest wait for a Transfer's next frame")
    message_deadline_s: float | None = Field(description="longest a Transfer may take")
    session_ttl_s: float = Field(description="seconds a decoded context is kept after its last use")
    max_cached_bytes_per_identity: int = Field(description="what one identity's decoded contexts may hold")
    max_cached_bytes: int | None = Field(description="decoded contexts and decodes in flight, all identities")
    max_concurrent_sessions: int | None = Field(description="Transfer and Ask calls in progress, all senders")
    max_buffered_bytes: int | None = Field(description="chunk data all transfers in flight may hold")
    shared_store: bool = Field(description="replicas share a store (--store): /v1/stats?scope=fleet answers")
    store_max_bytes: int | None = Field(description="what the shared store keeps, the whole fleet's")
    store_max_bytes_per_identity: int | None = Field(
        description="what one identity keeps in the shared store"
    )


class AskView(BaseModel):
    question: str
    answer: str
    token_ids: list[int]
    reference_answers: list[str]
    f1: float | None
    exact_match: float | None
    timings: dict[str, float]
    asked_at: float


class Message(BaseModel):
    message_id: str
    session_id: str
    owner: str
    config_label: str
    config: dict[str, Any]
    family: str = Field(description="the config's family (the Prometheus label)")
    length: int = Field(description="original context length T in tokens")
    length_bucket: str
    kept: int = Field(description="context positions kept (of layer 0)")
    fp16_bytes: int
    bytes: Bytes
    percent_of_fp16: float | None
    compression_ratio: float | None
    chunks: int
    retransmits: int
    retransmitted_bytes: int
    timings: dict[str, float]
    received_at: float
    asks: list[AskView]
    questions: int


class AskRequest(BaseModel):
    """A follow-up question about a context the caller sent (kvlink-ask's REST twin)."""

    question: str = Field(min_length=1, description="the question; the receiver tokenizes it")
    session_id: str = Field("", description="optional: the message id alone names the context")
    max_new_tokens: int = Field(32, ge=1, description="longest answer (clamped to the receiver's limit)")
    temperature: float = Field(0.0, ge=0, description="0: greedy; above 0: sample at this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="with temperature: nucleus mass")
    stop: list[str] = Field(default_factory=list, description="the answer ends after the first of these")
    reference_answers: list[str] = Field(default_factory=list, description="gold answers: F1/EM recorded")


class AnswerView(BaseModel):
    message_id: str
    answer: str
    token_ids: list[int]
    finish_reason: str = Field(description='"eos", "stop" or "length"')
    timings: dict[str, float]
    f1: float | None = None
    exact_match: float | None = None


class Released(BaseModel):
    message_id: str
    freed_bytes: int = Field(description="bytes of decoded cache given back")


class Problem(BaseModel):
    detail: str
