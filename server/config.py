"""The serving config: a YAML file validated by pydantic (unknown keys are errors that name the key)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mame_core import MergeSettings
from server.experiments.config import ExperimentConfig, check_experiment_name

DEFAULT_CONFIG = "default.yaml"


def _merge_settings(value: Any) -> MergeSettings:
    if isinstance(value, MergeSettings):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"a variant must be a mapping like {{method: mame, tau: 0.9}}, got {value!r}")  # noqa: TRY004 - pydantic reports ValueError
    return MergeSettings.from_dict(value)


Variant = Annotated[MergeSettings, BeforeValidator(_merge_settings)]


class _Strict(BaseModel):
    # allow_inf_nan=False: YAML's .inf passed `gt=0` and crashed the start (int(inf)); .nan got a false
    # reason.
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)


class BatchingConfig(_Strict):
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(5.0, ge=0, le=60_000)
    max_queue: int = Field(256, ge=1, description="images waiting per model; more are answered 503")
    queue_shares: dict[str, float] = Field(
        default_factory=dict,
        description="weight of each variant's guaranteed share of max_queue (unnamed variants: 1; 0: none)")

    @model_validator(mode="after")
    def _check_shares(self) -> BatchingConfig:
        negative = {name: w for name, w in self.queue_shares.items() if w < 0}
        if negative:
            raise ValueError(f"queue_shares: weights must be >= 0, got {negative}")
        return self


class ModelConfig(_Strict):
    arch: str = Field(description="timm model name, e.g. vit_base_patch16_224.augreg_in21k_ft_in1k")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to timm.create_model")
    weights: str = Field("auto", description="auto | random | path to a local checkpoint file")
    device: str = Field("auto", description="auto (every CUDA device, else cpu) | cpu | cuda | cuda:0,cuda:1")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    variants: dict[str, Variant] = Field(min_length=1)
    default_variant: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.default_variant is not None and self.default_variant not in self.variants:
            raise ValueError(
                f"default_variant {self.default_variant!r} is not one of the variants {sorted(self.variants)}"
            )
        if self.weights not in ("auto", "random") and not Path(self.weights).expanduser().is_file():
            raise ValueError(f"weights: {self.weights!r} is neither auto, random nor an existing file")
        unknown = sorted(set(self.batching.queue_shares) - set(self.variants))
        if unknown:
            raise ValueError(f"batching.queue_shares: {', '.join(map(repr, unknown))} is not one of the "
                             f"variants {sorted(self.variants)}")
        guarantees = self.queue_guarantees()
        for name in self.variants:
            if sum(g for other, g in guarantees.items() if other != name) >= self.batching.max_queue:
                raise ValueError(f"batching.queue_shares: variant {name!r} could never be queued: the "
                                 "other variants' shares take all of max_queue (give it a weight, or raise "
                                 "max_queue)")
        return self

    def queue_guarantees(self) -> dict[str, int]:
        """The places of `max_queue` each variant is sure to find however busy the others are: its weight's
        share (`batching.queue_shares`, 1 for a variant not named), rounded down."""
        weights = {name: self.batching.queue_shares.get(name, 1.0) for name in self.variants}
        total = sum(weights.values())
        if total <= 0:
            return dict.fromkeys(weights, 0)
        return {name: int(self.batching.max_queue * w / total) for name, w in weights.items()}

    @property
    def default_variant_name(self) -> str:
        return self.default_variant or next(iter(self.variants))


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1, description="width x height of one image (decompression bombs)")
    max_request_pixels: int = Field(160_000_000, ge=1, description="pixels of all the images of one request")
    max_decoding_pixels: int = Field(
        40_000_000, ge=1,
        description="pixels of large images (4 Mpx or more) being decoded at once in a process (an image "
                    "over it is decoded alone)")
    large_image_nice: int = Field(
        10, ge=0, le=19,
        description="how much the nice value (Linux) of the threads that decode large images is raised: the "
                    "cores go first to small requests and the forward passes (0: the same CPU priority)")
    max_images_per_request: int = Field(32, ge=1)
    request_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_top_k: int = Field(20, ge=1)


class HealthConfig(_Strict):
    device_stall_s: float = Field(
        20.0, gt=0, le=3600,
        description="a device that has had a batch this long without finishing one is stalled "
        "(docs/server.md)")
    engine_timeout_s: float = Field(
        2.0, gt=0, le=3600,
        description="front-ends answer /healthz and /readyz 503 when the engine does not answer within this")
    loop_stall_s: float = Field(
        2.0, gt=0, le=3600,
        description="an event loop that has not run for this long (a call blocks it) answers /healthz and "
        "/readyz 503 (docs/server.md)")


class ConnectionsConfig(_Strict):
    max_connections: int = Field(
        2048, ge=1,
        description="open client connections per listening process; more are answered 503 and closed")
    idle_timeout_s: float = Field(
        5.0, gt=0, le=3600,
        description="a connection with no request under way (new, or kept alive) is closed after this long")


class LabelsConfig(_Strict):
    max_answers: int = Field(
        100_000, ge=0,
        description="recent answers kept for POST /v1/labels (each image's top-5 and its route); 0: off")
    ttl_s: float = Field(3600.0, gt=0, le=7 * 86400, description="how long an answer can be labelled")


class ServingConfig(_Strict):
    models: dict[str, ModelConfig] = Field(min_length=1)
    default_model: str | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    connections: ConnectionsConfig = Field(default_factory=ConnectionsConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    experiments: dict[str, ExperimentConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ServingConfig:
        if self.default_model is not None and self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the models {sorted(self.models)}"
            )
        for name, exp in self.experiments.items():
            try:
                check_experiment_name(name)
            except ValueError as exc:
                raise ValueError(f"experiments: {exc}") from None
            if exp.model not in self.models:
                raise ValueError(
                    f"experiments.{name}.model: unknown model {exp.model!r}; known: {sorted(self.models)}"
                )
            try:
                exp.check_variants(self.models[exp.model].variants)
            except ValueError as exc:
                raise ValueError(f"experiments.{name}: {exc}") from None
        return self

    @property
    def default_model_name(self) -> str:
        return self.default_model or next(iter(self.models))


class ConfigError(Exception):
    """A serving config that cannot be used; the message names the file and the bad key."""


def parse_config(data: Any, source: str = "<config>") -> ServingConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the serving config must be a YAML mapping, got {type(data).__name__}")
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid serving config:"]
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"]) or "<top level>"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path | None = None) -> ServingConfig:
    """Load a YAML serving config; None loads the default shipped in the package."""
    if path is None:
        text = resources.files("server").joinpath("configs", DEFAULT_CONFIG).read_text()
        source = f"server/configs/{DEFAULT_CONFIG}"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read serving config {path}: {exc.strerror}") from None
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return parse_config(data, source)
