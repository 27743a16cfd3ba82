"""The provider interface: one protocol per capability, and the results a provider hands back.

A provider translates an OpenAI-shaped request into its upstream's wire format, calls it, and translates the
answer back; errors come out as GatewayErrors (errors.py). It never validates the client's request (validation.py
did, before any credit moved), never touches money (billing.py) and never knows Flask.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from config import ModelConfig, UpstreamConfig
    from errors import GatewayError


@dataclass
class ChatResult:
    """A whole chat (or legacy completion) answer."""

    doc: dict  # OpenAI's chat.completion / text_completion object, as the client gets it
    usage_report: Any  # the upstream's usage object as sent (billing.read_usage decides what to trust), or None
    texts: list[str]  # the text of each choice, counted when no usage report is believable


@dataclass
class ChatEvent:
    """One streamed chat event."""

    data: bytes  # the event's JSON as received: relayed unchanged unless the gateway removes its usage
    doc: dict  # that JSON parsed
    choices: list  # its choices (checked: objects whose delta and tool calls an SDK can read)
    usage_report: Any  # its usage object, or None
    texts: dict[int, str] = field(default_factory=dict)  # text each choice index delivered in this event


class ChatStream(Protocol):
    def events(self) -> Iterator[ChatEvent]:
        """Events until the upstream's end; raises GatewayError for an error event, a cut or a malformed event."""
        ...

    def finish(self) -> None:
        """After the last event: read the rest so the connection can be reused."""
        ...

    def close(self) -> None: ...


@dataclass
class ImageResult:
    doc: dict  # OpenAI's ImagesResponse
    count: int  # images in it
    failures: list[GatewayError] = field(default_factory=list)  # calls that failed while others succeeded


@dataclass
class MusicResult:
    pcm: bytes  # exactly the requested length of signed 16-bit little-endian PCM
    sample_rate: int
    channels: int
    sample_width: int


@dataclass
class ResponsesResult:
    """A whole Responses API answer (a Response object), native or translated from chat."""

    doc: dict
    usage_report: Any  # the Response's usage (input_tokens/output_tokens) or a chat usage object, or None
    texts: list[str]  # the text and call arguments of its output, counted when no usage is believable


@dataclass
class ResponsesEvent:
    """One typed Responses stream event as it goes to the client."""

    data: bytes  # the whole SSE frame (event: + data: lines)
    doc: dict
    usage_report: Any  # the final response's usage on response.completed / .incomplete / .failed, else None
    texts: dict[int, str] = field(default_factory=dict)  # text this event delivered (key 0)
    terminal: bool = False  # response.completed, .incomplete or .failed: nothing follows


class ResponsesStream(Protocol):
    def events(self) -> Iterator[ResponsesEvent]: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...

    def failed(self, exc: GatewayError) -> bytes:
        """The closing frame(s) for a stream that failed after it started (response.failed or an error event)."""
        ...


@dataclass
class SpeechResult:
    """Audio on its way: chunks() yields the bytes as they arrive; usage_report is set once the upstream sent one."""

    content_type: str
    chunks: Any  # a callable giving an iterator of bytes; raises GatewayError if the upstream breaks off
    close: Any  # a callable giving the connection back
    usage_report: Any = None


@dataclass
class TranscriptionResult:
    body: bytes  # the answer exactly as the upstream sent it
    content_type: str
    doc: dict | None  # the answer parsed, when it is JSON (json, verbose_json)


@runtime_checkable
class ChatProvider(Protocol):
    def chat(self, upstream: UpstreamConfig, route: str, body: dict) -> ChatResult:
        """route is "chat" or "completions"; body is OpenAI's, with model and output cap already set."""
        ...

    def chat_stream(self, upstream: UpstreamConfig, route: str, body: dict) -> ChatStream:
        """The stream once the upstream accepted the call; its usage report must be asked for by the provider."""
        ...

    def check_responses(self, upstream: UpstreamConfig, body: dict) -> None:
        """Raise a 400 naming the field for what this upstream cannot do with a Responses request (before holds)."""
        ...

    def responses(self, upstream: UpstreamConfig, body: dict) -> ResponsesResult:
        """body is the Responses request with model and max_output_tokens already set."""
        ...

    def responses_stream(self, upstream: UpstreamConfig, body: dict) -> ResponsesStream: ...


@runtime_checkable
class ImageProvider(Protocol):
    def images(self, upstream: UpstreamConfig, model: ModelConfig, body: dict, prompt: str, n: int,
               size: str | None, response_format: str | None) -> ImageResult:
        """Up to n images; raises the first failure when none came back."""
        ...


@runtime_checkable
class MusicProvider(Protocol):
    def music(self, upstream: UpstreamConfig, model: ModelConfig, prompts: list[dict], config: dict,
              seconds: float) -> MusicResult: ...


@runtime_checkable
class EmbeddingProvider(Protocol):
    def embeddings(self, upstream: UpstreamConfig, body: dict) -> dict:
        """OpenAI's embedding list as the upstream sent it (model already set)."""
        ...


@runtime_checkable
class SpeechProvider(Protocol):
    def speech(self, upstream: UpstreamConfig, model: ModelConfig, body: dict, want_usage: bool) -> SpeechResult:
        """Audio for body (model already set); want_usage asks the upstream for its usage report if it can."""
        ...


@runtime_checkable
class TranscriptionProvider(Protocol):
    def transcription(self, upstream: UpstreamConfig, route: str, fields: list[tuple[str, str]], filename: str,
                      content_type: str, file: Any, size: int) -> TranscriptionResult:
        """route is "transcriptions" or "translations"; file is read in blocks, never whole."""
        ...


@runtime_checkable
class ModerationProvider(Protocol):
    def moderations(self, upstream: UpstreamConfig, body: dict) -> dict: ...


# What each model mode needs from a provider.
CAPABILITIES: dict[str, type] = {"chat": ChatProvider, "image": ImageProvider, "music": MusicProvider,
                                 "embedding": EmbeddingProvider, "speech": SpeechProvider,
                                 "transcription": TranscriptionProvider, "moderation": ModerationProvider}
