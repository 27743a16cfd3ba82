"""config.toml, read once into frozen dataclasses and validated; a bad file stops start-up with one sentence."""
from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from billing import NANO
from errors import BadRequestError, ConfigError, ModelNotFoundError
from providers import KINDS

# What can serve what, as each provider declares it (providers/__init__.py imports no provider here).
MODEL_MODES = ("chat", "image", "music", "embedding", "speech", "transcription", "moderation")
MODE_KINDS = {mode: tuple(k for k, kind in KINDS.items() if mode in kind.modes) for mode in MODEL_MODES}
UPSTREAM_KINDS = tuple(KINDS)
URL_SCHEMES = {k: kind.schemes for k, kind in KINDS.items()}
# The schemes the `limits` package stores counters under (its storage registry, listed here so that checking a
# config never imports storage drivers into gunicorn's master before the workers patch for gevent).
STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix", "redis+cluster", "redis+sentinel", "valkey",
                   "valkeys", "valkey+unix", "valkey+cluster", "valkey+sentinel", "memcached", "mongodb",
                   "mongodb+srv")
STORAGE_DRIVERS = {"redis": "redis", "valkey": "valkey", "memcached": "pymemcache", "mongodb": "pymongo"}
MAX_PRICE = 10**6  # credits per million tokens, per image or per second
# Sane ranges for numeric settings, by name: (least, most). Beyond them a value is a typo or harms the gateway
# (max_body_bytes = 0 refuses every request, pool_size = 0 deadlocks every upstream call, a heartbeat of 1e400
# seconds is infinity). Settings not listed get the generic ranges in _typed.
BOUNDS: dict[str, tuple[float, float]] = {
    "max_body_bytes": (1024, 2**31), "heartbeat_seconds": (0.1, 3600), "hold_ttl_seconds": (1, 10**7),
    "default_rpm": (0, 10**9), "default_rpd": (0, 10**9),
    "timeout_seconds": (0.1, 86400), "connect_timeout_seconds": (0.1, 3600), "pool_size": (1, 100_000),
    "max_output_tokens": (0, 10**8), "max_images": (0, 1000), "max_image_bytes": (1024, 2**31),
    "fetch_timeout_seconds": (0.1, 3600), "cache_max_entries": (0, 10**8), "default_duration_seconds": (1, 3600),
    "usage_retention_days": (0, 100_000),
}
GENERIC_INT_MAX = 2**53
GENERIC_FLOAT_MAX = 10**6


@dataclass(frozen=True)
class ServerConfig:
    owner: str = "violations"
    database: str = "gateway.db"
    max_body_bytes: int = 20 * 1024 * 1024
    # Streams send an SSE comment this often while the upstream is silent, so a vanished client is noticed.
    heartbeat_seconds: float = 10.0
    # The longest a request can hold credits; `flask audit` lists holds older than this. Never shorter than the
    # longest upstream timeout. Age alone returns no hold: only the death of the process that took it does.
    hold_ttl_seconds: int = 3600
    # Origins (scheme://host[:port], or "*") whose browser pages may call the gateway; empty means no CORS at all.
    cors_origins: tuple[str, ...] = ()
    # Usage rows older than this many days are deleted in the background (retention.py); 0 keeps them forever.
    usage_retention_days: int = 0


@dataclass(frozen=True)
class LimitsConfig:
    default_rpm: int = 60
    default_rpd: int = 10000
    storage_uri: str = "memory://"
    strategy: str = "fixed-window"


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    kind: str
    base_url: str
    api_key_env: str = ""
    timeout_seconds: float = 120.0
    connect_timeout_seconds: float = 10.0
    # Field that carries the output cap the gateway adds when a chat request names none.
    max_tokens_field: str = "max_tokens"
    # False for upstreams that only take inline (data:) images, such as Gemini's OpenAI endpoint.
    fetches_image_urls: bool = True
    # Concurrent upstream connections kept open per worker.
    pool_size: int = 256
    # A non-streamed answer (or error body) past this size is a 502, read no further. Image answers are the
    # largest legitimate ones: ten high-quality PNGs in base64 come to about 40 MB.
    max_response_bytes: int = 64 * 1024 * 1024
    # One SSE event past this size ends a stream with an error; chat chunks are a few hundred bytes.
    max_event_bytes: int = 4 * 1024 * 1024
    # The whole of a non-streamed call, and a stream up to its first byte, must end within this (504 past it).
    # Unset: connect_timeout_seconds + timeout_seconds + 30, i.e. time to connect, to think, and 30 s to send.
    # A stream that has started is bounded by timeout_seconds per read only, so a long healthy stream is not cut.
    total_timeout_seconds: float | None = None
    # The upstream serves POST /responses itself (OpenAI does): Responses requests are relayed as they are.
    # False: they are translated to chat completions (Gemini's OpenAI endpoint, local servers).
    responses_api: bool = False

    def api_key(self) -> str | None:
        """The upstream key from the environment, or None when it is not set."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def deadline_seconds(self) -> float:
        """Seconds a non-streamed call, or a stream until its first byte, may take in all."""
        if self.total_timeout_seconds is not None:
            return self.total_timeout_seconds
        return self.connect_timeout_seconds + self.timeout_seconds + 30.0


@dataclass(frozen=True)
class ModelConfig:
    id: str
    upstream: str
    upstream_model: str
    mode: str = "chat"
    input_price: Decimal = Decimal(0)   # credits per million input tokens
    output_price: Decimal = Decimal(0)  # credits per million output tokens
    cached_input_price: Decimal | None = None  # per million prompt tokens served from the upstream's cache
    per_image: Decimal = Decimal(0)     # credits per image
    per_second: Decimal = Decimal(0)    # credits per second of audio
    per_minute: Decimal = Decimal(0)    # credits per minute of audio (transcription: whisper-1 is priced so)
    per_million_characters: Decimal = Decimal(0)  # credits per million input characters (speech: tts-1)
    vision: bool = False
    max_output_tokens: int = 4096

    # Prices in integer nano-credits, computed once: per million tokens, per image, per second.
    input_npm: int = field(init=False, repr=False)
    output_npm: int = field(init=False, repr=False)
    cached_npm: int = field(init=False, repr=False)  # the input price when no cached price is set
    image_nano: int = field(init=False, repr=False)
    second_nano: int = field(init=False, repr=False)
    minute_nano: int = field(init=False, repr=False)
    char_npm: int = field(init=False, repr=False)  # per million characters

    def __post_init__(self) -> None:
        for name, price in (("input_npm", self.input_price), ("output_npm", self.output_price),
                            ("image_nano", self.per_image), ("second_nano", self.per_second),
                            ("minute_nano", self.per_minute), ("char_npm", self.per_million_characters)):
            object.__setattr__(self, name, int(price * NANO))  # exact: config allows at most 9 decimals
        cached = self.input_price if self.cached_input_price is None else self.cached_input_price
        object.__setattr__(self, "cached_npm", int(cached * NANO))


@dataclass(frozen=True)
class VisionConfig:
    bridge_model: str | None = None
    allow_loopback_image_hosts: bool = False
    max_images: int = 10
    max_image_bytes: int = 20 * 1000 * 1000
    fetch_timeout_seconds: float = 15.0
    cache_max_entries: int = 10000


@dataclass(frozen=True)
class ImagesConfig:
    default_model: str = "gemini-2.5-flash-image"


@dataclass(frozen=True)
class MusicConfig:
    default_model: str = "lyria-realtime-exp"
    default_duration_seconds: float = 8.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    vision: VisionConfig = field(default_factory=VisionConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    music: MusicConfig = field(default_factory=MusicConfig)
    path: str = ""

    def upstream_for(self, model: ModelConfig) -> UpstreamConfig:
        return self.upstreams[model.upstream]

    def model_for(self, name: Any, mode: str, default: str | None = None) -> tuple[ModelConfig, UpstreamConfig]:
        """The model a request names (or the default when it names none), and its upstream; else OpenAI's error."""
        if name is None and default:
            name = default
        if not isinstance(name, str) or not name:
            raise BadRequestError("'model' must be a non-empty string.", param="model", code="invalid_type")
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(f"The model `{name}` does not exist or you do not have access to it.",
                                     param="model")
        if model.mode != mode:
            raise BadRequestError(f"The model `{name}` is a {model.mode} model and cannot serve a {mode} request.",
                                 param="model", code="model_not_supported")
        return model, self.upstreams[model.upstream]


def _typed(where: str, value: Any, default: Any, annotation: str) -> Any:
    """Check one value against its dataclass field's type and range, converting ints and decimals as TOML gives
    them. TOML floats arrive as Decimal, which includes inf and nan: those are refused before any comparison."""
    name = where.rsplit(".", 1)[-1]
    if annotation.startswith("tuple"):  # cors_origins, the one list setting
        if not isinstance(value, list) or not all(isinstance(v, str) and _origin_ok(v) for v in value):
            raise ConfigError(f"{where} must be a list of origins such as [\"https://app.example.com\"] (scheme, "
                              f"host and optional port, no path) or [\"*\"], not {value!r}.")
        return tuple(v.rstrip("/") for v in value)
    if "Decimal" in annotation:
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            raise ConfigError(f"{where} must be a number such as 0.4, not {value!r}.")
        value = Decimal(value)
        if not value.is_finite() or value < 0 or value > MAX_PRICE:
            raise ConfigError(f"{where} must be a price of zero or more, at most {MAX_PRICE} credits, not {value}; "
                              "fix the number.")
        if (value * NANO) != int(value * NANO):
            raise ConfigError(f"{where} must be zero or more with at most 9 decimal places, not {value}.")
        return value
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}.")
        return value
    if "float" in annotation:
        low, high = BOUNDS.get(name, (0, GENERIC_FLOAT_MAX))
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or \
                (isinstance(value, Decimal) and not value.is_finite()) or not 0 < value <= high or value < low:
            raise ConfigError(f"{where} must be a number of more than 0, from {low:g} to {high:g}, not {value!r}; "
                              "set it in that range.")
        return float(value)
    if "int" in annotation:
        low, high = BOUNDS.get(name, (0, GENERIC_INT_MAX))
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where} must be a whole number of 0 or more, not {value!r}.")
        if not low <= value <= high:
            raise ConfigError(f"{where} must be a whole number from {low} to {high}, not {value}; "
                              "set it in that range.")
        return value
    if not isinstance(value, str) or (not value and "None" not in annotation):
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}.")
    return value


def _origin_ok(origin: str) -> bool:
    if origin == "*":
        return True
    try:
        parts = urlsplit(origin.rstrip("/"))
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.path and not parts.query


def _build(cls: type, where: str, raw: Any, **given: Any) -> Any:
    """One dataclass from one TOML table: unknown keys and wrong types are errors that name the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table.")
    known = {f.name: f for f in fields(cls) if f.init}
    values = dict(given)
    for key, value in raw.items():
        if key not in known or key in given:
            names = ", ".join(n for n in known if n not in given)
            raise ConfigError(f"{where}.{key} is not a setting; known settings are: {names}.")
        values[key] = _typed(f"{where}.{key}", value, known[key].default, str(known[key].type))
    missing = [n for n, f in known.items()
               if n not in values and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where} needs {', '.join(missing)}; add it to config.toml.")
    return cls(**values)


def parse(raw: dict, path: str = "") -> Config:
    """A validated Config from a parsed TOML document."""
    top = {f.name for f in fields(Config)} - {"path"}
    for key in raw:
        if key not in top:
            raise ConfigError(f"[{key}] is not a section; known sections are: {', '.join(sorted(top))}.")
    upstreams = {}
    for name, table in raw.get("upstreams", {}).items():
        up = _build(UpstreamConfig, f"[upstreams.{name}]", table, name=name)
        if up.kind not in UPSTREAM_KINDS:
            raise ConfigError(f"[upstreams.{name}].kind must be one of {', '.join(UPSTREAM_KINDS)}, not {up.kind!r}.")
        if up.max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ConfigError(f"[upstreams.{name}].max_tokens_field must be max_tokens or max_completion_tokens.")
        _check_url(f"[upstreams.{name}].base_url", up.base_url, URL_SCHEMES[up.kind], up.kind)
        upstreams[name] = up
    models = {}
    for model_id, table in raw.get("models", {}).items():
        where = f'[models."{model_id}"]'
        if isinstance(table, dict) and "upstream_model" not in table:
            table = {**table, "upstream_model": model_id}
        model = _build(ModelConfig, where, table, id=model_id)
        if model.upstream not in upstreams:
            raise ConfigError(f"{where}.upstream names {model.upstream!r}, which is not an [upstreams.NAME] table.")
        if model.mode not in MODEL_MODES:
            raise ConfigError(f"{where}.mode must be one of {', '.join(MODEL_MODES)}, not {model.mode!r}.")
        kinds, kind = MODE_KINDS[model.mode], upstreams[model.upstream].kind
        if kind not in kinds:
            raise ConfigError(f"{where} is a {model.mode} model, so its upstream must be of kind "
                              f"{' or '.join(kinds)}; [upstreams.{model.upstream}] is {kind}.")
        if model.mode == "chat" and model.max_output_tokens < 1:
            raise ConfigError(f"{where}.max_output_tokens must be at least 1.")
        models[model_id] = model
    cfg = Config(
        server=_build(ServerConfig, "[server]", raw.get("server", {})),
        limits=_build(LimitsConfig, "[limits]", raw.get("limits", {})),
        upstreams=upstreams, models=models,
        vision=_build(VisionConfig, "[vision]", raw.get("vision", {})),
        images=_build(ImagesConfig, "[images]", raw.get("images", {})),
        music=_build(MusicConfig, "[music]", raw.get("music", {})),
        path=path,
    )
    longest = max((u.timeout_seconds for u in upstreams.values()), default=0)
    if cfg.server.hold_ttl_seconds < longest:
        raise ConfigError(f"[server].hold_ttl_seconds ({cfg.server.hold_ttl_seconds}) must be at least the longest "
                          f"upstream timeout_seconds ({longest:g}); raise it.")
    scheme = cfg.limits.storage_uri.partition("://")[0]
    if "://" not in cfg.limits.storage_uri or scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"[limits].storage_uri {cfg.limits.storage_uri!r} must start with one of "
                          f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}; use \"memory://\" for one worker or "
                          "\"redis://HOST:6379/0\" for several.")
    driver = next((module for prefix, module in STORAGE_DRIVERS.items() if scheme.startswith(prefix)), None)
    if driver and importlib.util.find_spec(driver) is None:  # looked up, not imported
        raise ConfigError(f"[limits].storage_uri {cfg.limits.storage_uri!r} needs the Python package {driver!r}, "
                          f"which is not installed; install it or use \"memory://\".")
    if cfg.limits.strategy not in ("fixed-window", "moving-window", "sliding-window-counter"):
        raise ConfigError("[limits].strategy must be fixed-window, moving-window or sliding-window-counter.")
    bridge = cfg.vision.bridge_model
    if bridge is not None and (bridge not in models or not models[bridge].vision):
        raise ConfigError(f"[vision].bridge_model {bridge!r} must name a model in config.toml with vision = true.")
    return cfg


def _check_url(where: str, url: str, schemes: tuple[str, ...], kind: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{where} {url!r} must be a {' or '.join(s + '://' for s in schemes)} URL with a host, "
                          f"as a {kind} upstream is reached over {schemes[0]}; fix the address.")


def load(path: str | None = None) -> Config:
    """Read and validate the config file named by the argument, $GATEWAY_CONFIG, or ./config.toml."""
    path = path or os.environ.get("GATEWAY_CONFIG") or "config.toml"
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f, parse_float=Decimal)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; set GATEWAY_CONFIG to its path.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the line it names.") from None
    cfg = parse(raw, str(Path(path).resolve()))
    database = cfg.server.database
    if not os.path.isabs(database):
        # A relative database path is relative to the config file, so `flask` and gunicorn agree from any cwd.
        database = str(Path(cfg.path).parent / database)
        cfg = Config(**{**cfg.__dict__, "server": ServerConfig(**{**cfg.server.__dict__, "database": database})})
    return cfg
