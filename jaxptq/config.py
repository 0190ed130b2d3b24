"""QuantConfig: MindSpore Lite's converter INI sections as frozen dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

QUANT_TYPES = ("WEIGHT_QUANT", "FULL_QUANT", "DYNAMIC_QUANT")
ACTIVATION_QUANT_METHODS = ("MAX_MIN", "KL", "REMOVAL_OUTLIER")
TARGET_DEVICES = ("CPU", "NVGPU", "DSP", "ASCEND")
QUANT_STRATEGIES = ("ALWC", "ACWL")
INPUT_TYPES = ("IMAGE", "BIN")
IMAGE_FORMATS = ("RGB", "GRAY", "BGR")
RESIZE_METHODS = ("LINEAR", "NEAREST", "CUBIC")


class ConfigError(ValueError):
    """A config value is out of range, of the wrong type, or names nothing."""


def _choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"[{section}] `{key}` = {value!r} is not valid; choose one of {', '.join(choices)}."
        )


def _int_range(section: str, key: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"[{section}] `{key}` must be an integer, got {value!r}.")
    if value < lo or (hi is not None and value > hi):
        upper = "" if hi is None else f"..{hi}"
        raise ConfigError(f"[{section}] `{key}` = {value} is out of range {lo}{upper}.")


def _float_range(section: str, key: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"[{section}] `{key}` must be a number, got {value!r}.")
    if not lo <= value <= hi:
        raise ConfigError(f"[{section}] `{key}` = {value} is out of range [{lo}, {hi}].")


def _bool(section: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"[{section}] `{key}` must be true or false, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class CommonQuantParam:
    """`[common_quant_param]`: what to quantize and how many bits."""

    # WEIGHT_QUANT (weights only), FULL_QUANT (int8 weights and activations), DYNAMIC_QUANT.
    quant_type: str = "WEIGHT_QUANT"
    # Weight bits, 1..16; 0 asks for a mixed-bit search (WEIGHT_QUANT only).
    bit_num: int = 8
    # Sites whose weight has fewer elements than this stay float.
    min_quant_weight_size: int = 0
    # Sites whose weight has fewer output channels than this stay float.
    min_quant_weight_channel: int = 16
    # Site names (ONNX node names, Flax module paths) to leave in float.
    skip_quant_node: tuple[str, ...] = ()
    # Folder for the debug CSVs and pictures; None turns debug mode off.
    debug_info_save_path: str | None = None
    # Pack sub-8-bit weights densely (two 4-bit values a byte).
    enable_encode: bool = True

    def validate(self) -> None:
        s = "common_quant_param"
        _choice(s, "quant_type", self.quant_type, QUANT_TYPES)
        _int_range(s, "bit_num", self.bit_num, 0, 16)
        if self.bit_num == 0 and self.quant_type != "WEIGHT_QUANT":
            raise ConfigError(
                f"[{s}] `bit_num` = 0 (mixed-bit search) needs `quant_type` = WEIGHT_QUANT, "
                f"got {self.quant_type}."
            )
        if self.quant_type in ("FULL_QUANT", "DYNAMIC_QUANT") and self.bit_num != 8:
            raise ConfigError(
                f"[{s}] `bit_num` = {self.bit_num} is not supported with {self.quant_type}; "
                "it quantizes to 8 bits, set `bit_num` = 8."
            )
        _int_range(s, "min_quant_weight_size", self.min_quant_weight_size, 0, 65535)
        _int_range(s, "min_quant_weight_channel", self.min_quant_weight_channel, 0, 65535)
        if not all(isinstance(n, str) for n in self.skip_quant_node):
            raise ConfigError(
                f"[{s}] `skip_quant_node` must hold names, got {self.skip_quant_node!r}."
            )
        _bool(s, "enable_encode", self.enable_encode)
        if not self.enable_encode and self.bit_num not in (8, 16):
            raise ConfigError(
                f"[{s}] `enable_encode` = false needs `bit_num` 8 or 16 (got {self.bit_num}): "
                "other widths are only stored packed, as in MindSpore Lite."
            )


@dataclass(frozen=True, kw_only=True)
class MixedBitWeightQuantParam:
    """`[mixed_bit_weight_quant_param]`: the per-site bit search of `bit_num` = 0."""

    # Target relative weight error; larger compresses more (0.02 is about 6-7 fixed bits).
    init_scale: float = 0.02
    # Search `init_scale` so the output cosine similarity lands near 0.995.
    auto_tune: bool = False

    def validate(self) -> None:
        s = "mixed_bit_weight_quant_param"
        _float_range(s, "init_scale", self.init_scale, 1e-6, 1.0)
        _bool(s, "auto_tune", self.auto_tune)


@dataclass(frozen=True, kw_only=True)
class FullQuantParam:
    """`[full_quant_param]`: activation calibration for FULL_QUANT."""

    # MAX_MIN, KL (TensorRT entropy search) or REMOVAL_OUTLIER.
    activation_quant_method: str = "MAX_MIN"
    # Fold the mean float-vs-int8 output error per channel into the bias.
    bias_correction: bool = True
    # Per-channel weight scales; False gives one scale per layer.
    per_channel: bool = True
    # Backend whose integer conventions the plan must follow; None means generic CPU.
    target_device: str | None = None
    # REMOVAL_OUTLIER drops this fraction of values at each end before taking the range.
    outlier_percent: float = 0.0001

    def validate(self) -> None:
        s = "full_quant_param"
        _choice(
            s, "activation_quant_method", self.activation_quant_method, ACTIVATION_QUANT_METHODS
        )
        _bool(s, "bias_correction", self.bias_correction)
        _bool(s, "per_channel", self.per_channel)
        if self.target_device is not None:
            _choice(s, "target_device", self.target_device, TARGET_DEVICES)
        _float_range(s, "outlier_percent", self.outlier_percent, 0.0, 0.1)


@dataclass(frozen=True, kw_only=True)
class DataPreprocessParam:
    """`[data_preprocess_param]`: how calibration files become model inputs."""

    # `input_name:dir[,input_name2:dir2]`.
    calibrate_path: str | None = None
    # Number of calibration samples to read per input.
    calibrate_size: int = 100
    # IMAGE (decoded, resized, normalized) or BIN (raw buffers of the input's dtype).
    input_type: str = "IMAGE"
    image_to_format: str = "RGB"
    normalize_mean: tuple[float, ...] = ()
    normalize_std: tuple[float, ...] = ()
    resize_width: int | None = None
    resize_height: int | None = None
    resize_method: str = "LINEAR"
    center_crop_width: int | None = None
    center_crop_height: int | None = None

    def validate(self) -> None:
        s = "data_preprocess_param"
        _int_range(s, "calibrate_size", self.calibrate_size, 1, 65535)
        _choice(s, "input_type", self.input_type, INPUT_TYPES)
        _choice(s, "image_to_format", self.image_to_format, IMAGE_FORMATS)
        _choice(s, "resize_method", self.resize_method, RESIZE_METHODS)
        for key in ("resize_width", "resize_height", "center_crop_width", "center_crop_height"):
            value = getattr(self, key)
            if value is not None:
                _int_range(s, key, value, 1, 65535)
        if any(v == 0 for v in self.normalize_std):
            raise ConfigError(f"[{s}] `normalize_std` must not contain 0: {self.normalize_std}.")


@dataclass(frozen=True, kw_only=True)
class DynamicQuantParam:
    """`[dynamic_quant_param]`: run-time activation quantization."""

    # ALWC: activation per-layer, weight per-channel. ACWL: activation per-channel, weight
    # per-layer.
    quant_strategy: str = "ALWC"

    def validate(self) -> None:
        _choice("dynamic_quant_param", "quant_strategy", self.quant_strategy, QUANT_STRATEGIES)


KV_GRANULARITIES = ("PER_TOKEN_HEAD", "PER_CHANNEL")


@dataclass(frozen=True, kw_only=True)
class KVCacheQuantParam:
    """`[kv_cache_quant_param]`: integer key/value cache of a decoder (jaxptq extension)."""

    # Store the attention key/value cache as integers (quantize on write, dequantize on read).
    kv_enable: bool = False
    # PER_TOKEN_HEAD: a scale per written token and head, computed at write time (dynamic).
    # PER_CHANNEL: a scale per head-dim channel, calibrated once over calibration text.
    kv_granularity: str = "PER_TOKEN_HEAD"
    # Bits of the stored values, 2..8; all widths are held in int8 containers.
    kv_bits: int = 8

    def validate(self) -> None:
        s = "kv_cache_quant_param"
        _bool(s, "kv_enable", self.kv_enable)
        _choice(s, "kv_granularity", self.kv_granularity, KV_GRANULARITIES)
        _int_range(s, "kv_bits", self.kv_bits, 2, 8)


SECTIONS: dict[str, type] = {
    "common_quant_param": CommonQuantParam,
    "mixed_bit_weight_quant_param": MixedBitWeightQuantParam,
    "full_quant_param": FullQuantParam,
    "data_preprocess_param": DataPreprocessParam,
    "dynamic_quant_param": DynamicQuantParam,
    "kv_cache_quant_param": KVCacheQuantParam,
}


def _key_to_section() -> dict[str, str]:
    table: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in table, f"key {f.name} in two sections"
            table[f.name] = section
    return table


KEY_TO_SECTION = _key_to_section()


def closest(name: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """The candidates spelled most like `name`, for "did you mean" messages."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Everything `ptq` needs to know, one field per MindSpore Lite INI section.

    Example:
        >>> cfg = QuantConfig.create(quant_type="FULL_QUANT", activation_quant_method="KL")
        >>> cfg.full_quant_param.activation_quant_method
        'KL'
    """

    common_quant_param: CommonQuantParam = field(default_factory=CommonQuantParam)
    mixed_bit_weight_quant_param: MixedBitWeightQuantParam = field(
        default_factory=MixedBitWeightQuantParam
    )
    full_quant_param: FullQuantParam = field(default_factory=FullQuantParam)
    data_preprocess_param: DataPreprocessParam = field(default_factory=DataPreprocessParam)
    dynamic_quant_param: DynamicQuantParam = field(default_factory=DynamicQuantParam)
    kv_cache_quant_param: KVCacheQuantParam = field(default_factory=KVCacheQuantParam)

    def __post_init__(self) -> None:
        for section in SECTIONS:
            getattr(self, section).validate()

    @classmethod
    def create(cls, **keys: Any) -> QuantConfig:
        """Builds a config from flat MindSpore key names, each placed in its own section."""
        grouped: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in keys.items():
            section = KEY_TO_SECTION.get(key)
            if section is None:
                hint = closest(key, list(KEY_TO_SECTION))
                raise ConfigError(
                    f"unknown config key `{key}`"
                    + (f"; did you mean {', '.join(f'`{h}`' for h in hint)}?" if hint else ".")
                )
            if key == "skip_quant_node" and isinstance(value, str):
                value = (value,)
            if isinstance(value, list):
                value = tuple(value)
            grouped[section][key] = value
        return cls(**{s: SECTIONS[s](**kv) for s, kv in grouped.items()})

    def replace(self, **keys: Any) -> QuantConfig:
        """A copy with some flat keys changed, validated again."""
        merged = self.to_flat() | keys
        return QuantConfig.create(**merged)

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in SECTIONS:
            out |= dataclasses.asdict(getattr(self, section))
        return out

    @property
    def quant_type(self) -> str:
        return self.common_quant_param.quant_type

    @classmethod
    def from_ini(cls, path: str) -> QuantConfig:
        """Reads a MindSpore Lite converter config file (see `jaxptq.ini`)."""
        from jaxptq import ini

        return ini.read_config(path)

    def to_ini(self, path: str) -> None:
        """Writes this config as a MindSpore Lite converter config file."""
        from jaxptq import ini

        ini.write_config(self, path)


def as_config(config: QuantConfig | Mapping[str, Any] | None) -> QuantConfig:
    """Accepts a QuantConfig, a dict of flat keys, or None (all defaults)."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return QuantConfig.create(**config)
    raise TypeError(
        f"`config` must be a QuantConfig or a dict of keys, got {type(config).__name__}."
    )
