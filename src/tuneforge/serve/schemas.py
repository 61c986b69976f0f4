"""What the HTTP API takes and answers in errors: OpenAI-shaped error bodies
(`ApiError`), the request schemas (every string checked for valid Unicode
once, by the `Text` type), and how validation errors are shown."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from tuneforge.serve.security import error_body

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
               504: "timeout_error"}
INFERENCE_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/rewards"}


class ApiError(HTTPException):
    """An error in OpenAI's shape. A starlette HTTPException so that FastAPI lets
    it pass through body parsing (the 413 raised mid-read)."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(status, message, headers)
        self.message, self.code, self.param = message, code, param


def error_response(status: int, message: str, code=None, param=None, headers=None) -> Response:
    return Response(error_body(status, message, ERROR_TYPES.get(status, "invalid_request_error"), code, param),
                    status_code=status, media_type="application/json", headers=headers)


def error_loc(error: dict) -> str:
    """`messages.0.content` for a validation error. Union members show in pydantic's
    loc as type tags (`list[str]`); a field name never holds a bracket."""
    return ".".join(str(x) for x in error.get("loc", ())
                    if x != "body" and not (isinstance(x, str) and "[" in x))


# ------------------------------------------------------------------ schemas

# Error types that are the client's text, not its JSON's shape: 400, as OpenAI.
TEXT_ERRORS = {"invalid_unicode", "string_unicode"}


def valid_unicode(text: str) -> str:
    """`text` if it encodes as UTF-8. JSON's "\\ud800" escape decodes to a lone
    surrogate, which tokenizers (and the request log) cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("invalid_unicode", "text is not valid Unicode: lone surrogate {char} at "
                                  "position {position}; send UTF-8 text",
                                  {"char": f"U+{ord(text[exc.start]):04X}", "position": exc.start}) from None
    return text


# Every string a request carries (texts, names, paths) is checked once, here.
Text = Annotated[str, AfterValidator(valid_unicode)]


class Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; the
    # unsupported ones that would change the answer are refused explicitly below.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: Text = Field(description="The text.")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: Union[Text, list[TextPart]] = Field(description="The message text, or a list of text parts.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampling(Body):
    model: Text = Field(description="The served base model or adapter name.")
    max_tokens: Optional[int] = Field(None, ge=1, description="New tokens at most; capped by the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=128, description="Choices per prompt.")
    stop: Optional[Union[Text, list[Text]]] = Field(None, description="Up to 4 stop strings.")
    # int64, as OpenAI: a larger seed overflows torch.Generator.manual_seed.
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1, description="Seed for reproducible sampling.")
    stream: bool = Field(False, description="Server-sent events.")
    stream_options: Optional[dict] = Field(None, description="{'include_usage': true} adds a usage chunk.")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "invalid_value", "stop")
        return stops


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Newer name for max_tokens.")


class CompletionRequest(Sampling):
    prompt: Union[Text, list[Text]] = Field(description="A prompt or a list of prompts.")
    echo: bool = Field(False, description="Not supported.")


class ClassifyRequest(Body):
    model: Text = Field(description="The served classifier or adapter name.")
    input: Union[Text, list[Text]] = Field(description="A text or a list of texts.")
    groups: Optional[list[Text]] = Field(
        None, description="One group per input, for models saved with fairness post-processing by a group column.")


class RewardPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text = Field(description="The conversation so far: a user message, or an HH-style Human/Assistant "
                                     "transcript ending with 'Assistant:'.")
    response: Text = Field(description="The assistant response to score (may be empty).")


class RewardRequest(Body):
    model: Text = Field(description="The served reward model or adapter name.")
    prompt: Optional[Text] = Field(None, description="One prompt, scored with each of `responses`.")
    responses: Optional[list[Text]] = Field(None, description="Responses to `prompt`, each scored on its own.")
    input: Optional[list[RewardPair]] = Field(
        None, description="Instead of prompt + responses: a list of {prompt, response} pairs.")

    def pairs(self) -> list[tuple[str, str]]:
        """(prompt, response) per score asked for; 400 unless exactly one of the two shapes is given."""
        if (self.input is None) == (self.prompt is None and self.responses is None):
            raise ApiError(400, "give either prompt + responses, or input: [{prompt, response}, ...]",
                           "invalid_value", "input")
        if self.input is not None:
            return [(p.prompt, p.response) for p in self.input]
        if self.prompt is None or self.responses is None:
            raise ApiError(400, "prompt and responses go together", "invalid_value",
                           "responses" if self.responses is None else "prompt")
        return [(self.prompt, r) for r in self.responses]


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="The name requests will use.")
    path: Text = Field(description="A LoRA run folder, or a peft adapter folder, on the server.")
