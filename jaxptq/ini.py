"""MindSpore Lite converter config files (INI) read into and written from `QuantConfig`.

The reader takes the documentation's example files as written: `#` comment lines,
`key=value` or `key = value`, vectors as `[127.5, 127.5, 127.5]`, booleans in any case,
`skip_quant_node` as comma-separated names. A key left out keeps MindSpore's default.
Every error names the file and line. Two more dialects are accepted:

- `[weight_quant_param]` (MindSpore Lite r2.x): `per_channel` maps onto
  `[full_quant_param] per_channel` (the weight pass reads it), `dequant_strategy` must be
  `ON_THE_FLY` (what jaxptq always does: integer weights are dequantized inside the
  program), `bias_correction = true` is accepted with a warning (no weight-only bias
  correction here).
- The flat files of converter_lite's `--quantType=PostTraining --configFile=...` (r1.x):
  `image_path`, `batch_count`, `method_x`, `thread_num`, `bias_correction`, no sections.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

from jaxptq import atomic
from jaxptq.config import SECTIONS, ConfigError, QuantConfig, closest


class ConfigWarning(UserWarning):
    """A documented MindSpore setting that jaxptq accepts but has no use for."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    value: str
    line: int


_Raw = dict[str, dict[str, _Entry]]


class _BadValue(Exception):
    """A value that does not parse; re-raised as ConfigError with its location."""


# --- value parsers, keyed by the field's annotation ----------------------------------------


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low not in ("true", "false"):
        raise _BadValue(f"must be true or false, got {text!r}")
    return low == "true"


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _BadValue(f"must be an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _BadValue(f"must be a number, got {text!r}") from None


def _parse_optional_str(text: str) -> str | None:
    return text or None


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _parse_vector(text: str) -> tuple[float, ...]:
    body = text
    if body.startswith("[") != body.endswith("]"):
        raise _BadValue(f"must be a vector like [127.5, 127.5, 127.5], got {text!r}")
    body = body.strip("[]").strip()
    if not body:
        return ()
    try:
        return tuple(float(v) for v in re.split(r"[,\s]+", body) if v)
    except ValueError:
        raise _BadValue(f"must be a vector of numbers like [127.5, 127.5], got {text!r}") from None


_PARSERS: dict[str, Callable[[str], Any]] = {
    "bool": _parse_bool,
    "float": _parse_float,
    "int": _parse_int,
    "int | None": _parse_int,
    "str": str,
    "str | None": _parse_optional_str,
    "tuple[float, ...]": _parse_vector,
    "tuple[str, ...]": _parse_names,
}

# Enumerations are matched in any case; documentation spellings map to ours.
_ENUM_KEYS = {
    "activation_quant_method",
    "image_to_format",
    "input_type",
    "kv_granularity",
    "quant_strategy",
    "quant_type",
    "resize_method",
    "target_device",
}
_ALIASES = {
    ("activation_quant_method", "REMOVALOUTLIER"): "REMOVAL_OUTLIER",
    ("resize_method", "NEARST"): "NEAREST",
}

# Sections of a converter config that configure something other than quantization.
_IGNORED_SECTIONS = {
    "ascend_context": "Ascend graph-compiler settings",
}

# Documented keys with no field of their own: (section, key) -> handler(value, entry, ctx).
_WEIGHT_SECTION = "weight_quant_param"
_LEGACY_KEYS = ("image_path", "batch_count", "method_x", "thread_num", "bias_correction")


def _annotation(section: str, key: str) -> str:
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return str(f.type)
    raise KeyError(key)


def _field_names(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def _parse_value(section: str, key: str, entry: _Entry, source: str) -> Any:
    text = entry.value
    try:
        value = _PARSERS[_annotation(section, key)](text)
    except _BadValue as err:
        raise ConfigError(f"{source}:{entry.line}: [{section}] `{key}` {err}.") from None
    if key in _ENUM_KEYS and isinstance(value, str):
        value = value.upper()
        value = _ALIASES.get((key, value), value)
    return value


# --- the file format -----------------------------------------------------------------------


def _split_lines(text: str, source: str) -> tuple[_Raw, dict[str, _Entry]]:
    """Sections of raw entries, plus the keys written before any section header."""
    sections: _Raw = {}
    loose: dict[str, _Entry] = {}
    current: dict[str, _Entry] | None = None
    current_name = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(
                    f"{source}:{number}: malformed section header {line!r}; expected `[name]`."
                )
            current_name = line[1:-1].strip()
            current = sections.setdefault(current_name, {})
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(
                f"{source}:{number}: expected `key=value` or `[section]`, got {line!r}."
            )
        target = loose if current is None else current
        if key in target:
            where = f"[{current_name}] " if current is not None else ""
            raise ConfigError(
                f"{source}:{number}: {where}`{key}` is set twice (first on line "
                f"{target[key].line})."
            )
        target[key] = _Entry(value.strip(), number)
    return sections, loose


def _unknown_key(source: str, section: str, key: str, entry: _Entry, valid: list[str]) -> None:
    hint = closest(key, valid)
    raise ConfigError(
        f"{source}:{entry.line}: unknown key `{key}` in [{section}]"
        + (f"; did you mean {', '.join(f'`{h}`' for h in hint)}?" if hint else ".")
        + f" Valid keys: {', '.join(valid)}."
    )


def _weight_quant_param(
    entries: dict[str, _Entry],
    source: str,
    grouped: dict[str, dict[str, Any]],
    lines: dict[str, dict[str, int]],
) -> None:
    """Maps the r2.x `[weight_quant_param]` section onto our fields."""
    valid = ["dequant_strategy", "per_channel", "bias_correction"]
    for key, entry in entries.items():
        if key not in valid:
            _unknown_key(source, _WEIGHT_SECTION, key, entry, valid)
        where = f"{source}:{entry.line}: [{_WEIGHT_SECTION}] `{key}`"
        if key == "dequant_strategy":
            if entry.value.upper() != "ON_THE_FLY":
                raise ConfigError(
                    f"{where} = {entry.value!r} is not valid; choose one of ON_THE_FLY."
                )
        elif key == "bias_correction":
            _warn_when_on(
                where,
                entry,
                "has no equivalent in jaxptq (weight-only quantization has no "
                "bias correction); ignored.",
            )
        else:  # per_channel: the weight pass reads [full_quant_param] per_channel
            try:
                value = _parse_bool(entry.value)
            except _BadValue as err:
                raise ConfigError(f"{where} {err}.") from None
            full = grouped["full_quant_param"]
            if "per_channel" in full and full["per_channel"] != value:
                other = lines["full_quant_param"]["per_channel"]
                raise ConfigError(
                    f"{where} = {entry.value} contradicts [full_quant_param] `per_channel` on "
                    f"line {other}; set it once."
                )
            full["per_channel"] = value
            lines["full_quant_param"]["per_channel"] = entry.line


def _warn_when_on(where: str, entry: _Entry, consequence: str) -> None:
    """A boolean key jaxptq accepts but has no use for: parsed, and a warning when on."""
    try:
        on = _parse_bool(entry.value)
    except _BadValue as err:
        raise ConfigError(f"{where} {err}.") from None
    if on:
        warnings.warn(f"{where} = true {consequence}", ConfigWarning, stacklevel=5)


def _full_quant_extra(key: str, entry: _Entry, source: str) -> bool:
    """`enable_all_ops` (Micro only in MindSpore): accepted, warned about when on."""
    if key != "enable_all_ops":
        return False
    where = f"{source}:{entry.line}: [full_quant_param] `enable_all_ops`"
    _warn_when_on(
        where,
        entry,
        "is a MindSpore Micro setting; jaxptq quantizes every supported site anyway. Ignored.",
    )
    return True


def _build(
    grouped: dict[str, dict[str, Any]], lines: dict[str, dict[str, int]], source: str
) -> QuantConfig:
    """Constructs and validates each section, pointing errors at the offending line."""
    built = {}
    for section, kwargs in grouped.items():
        try:
            obj = SECTIONS[section](**kwargs)
            obj.validate()
        except ConfigError as err:
            message = str(err)
            line = next((n for k, n in lines[section].items() if f"`{k}`" in message), None)
            where = f"{source}:{line}" if line is not None else source
            raise ConfigError(f"{where}: {message}") from None
        built[section] = obj
    try:
        return QuantConfig(**built)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_config(text: str, source: str = "<config>") -> QuantConfig:
    """Parses the text of a converter config file.

    Args:
        text: the file's contents.
        source: the name used in error messages (the file's path).

    Returns:
        The validated `QuantConfig`.

    Raises:
        ConfigError: naming the file, line, section and key of the first problem.
    """
    sections, loose = _split_lines(text, source)
    if loose and not sections:
        return _legacy_config(loose, source)
    if loose:
        key, entry = next(iter(loose.items()))
        raise ConfigError(
            f"{source}:{entry.line}: `{key}` comes before any section; put it under its "
            "section, e.g. [common_quant_param]."
        )
    grouped: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    lines: dict[str, dict[str, int]] = {s: {} for s in SECTIONS}
    weight_entries: dict[str, _Entry] | None = None
    for section, entries in sections.items():
        if section == _WEIGHT_SECTION:
            weight_entries = entries
            continue
        if section in _IGNORED_SECTIONS:
            if entries:
                first = next(iter(entries.values())).line
                warnings.warn(
                    f"{source}:{first}: [{section}] holds {_IGNORED_SECTIONS[section]}, "
                    "which jaxptq does not use; ignored.",
                    ConfigWarning,
                    stacklevel=3,
                )
            continue
        if section not in SECTIONS:
            valid = [*SECTIONS, _WEIGHT_SECTION, *_IGNORED_SECTIONS]
            hint = closest(section, valid)
            line = min((e.line for e in entries.values()), default=0)
            raise ConfigError(
                f"{source}: unknown section [{section}]"
                + (f" (its first key is on line {line})" if line else "")
                + (f"; did you mean {', '.join(f'[{h}]' for h in hint)}?" if hint else ".")
                + f" Valid sections: {', '.join(valid)}."
            )
        valid = _field_names(section)
        for key, entry in entries.items():
            if key not in valid:
                if section == "full_quant_param" and _full_quant_extra(key, entry, source):
                    continue
                _unknown_key(source, section, key, entry, valid)
            grouped[section][key] = _parse_value(section, key, entry, source)
            lines[section][key] = entry.line
    if weight_entries is not None:
        _weight_quant_param(weight_entries, source, grouped, lines)
    return _build(grouped, lines, source)


def _legacy_config(entries: dict[str, _Entry], source: str) -> QuantConfig:
    """converter_lite r1.x `--quantType=PostTraining` files: flat keys, no sections."""
    grouped: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    lines: dict[str, dict[str, int]] = {s: {} for s in SECTIONS}
    grouped["common_quant_param"]["quant_type"] = "FULL_QUANT"
    # MindSpore r1.x defaults: KL calibration, no bias correction.
    grouped["full_quant_param"]["activation_quant_method"] = "KL"
    grouped["full_quant_param"]["bias_correction"] = False
    target = {
        "image_path": ("data_preprocess_param", "calibrate_path"),
        "batch_count": ("data_preprocess_param", "calibrate_size"),
        "method_x": ("full_quant_param", "activation_quant_method"),
        "bias_correction": ("full_quant_param", "bias_correction"),
    }
    for key, entry in entries.items():
        if key == "thread_num":
            try:
                value = _parse_int(entry.value)
            except _BadValue as err:
                raise ConfigError(f"{source}:{entry.line}: `thread_num` {err}.") from None
            if value < 1:
                raise ConfigError(f"{source}:{entry.line}: `thread_num` = {value} must be >= 1.")
            if value > 1:  # 1 is the r1.x default: nothing to say
                warnings.warn(
                    f"{source}:{entry.line}: `thread_num` has no equivalent (XLA picks its "
                    "own threads); ignored.",
                    ConfigWarning,
                    stacklevel=4,
                )
            continue
        if key not in target:
            valid = list(_LEGACY_KEYS)
            hint = closest(key, valid + list(dict.fromkeys(_all_keys())))
            raise ConfigError(
                f"{source}:{entry.line}: unknown key `{key}` in a flat (sectionless) "
                "converter config"
                + (f"; did you mean {', '.join(f'`{h}`' for h in hint)}?" if hint else ".")
                + f" Flat files take {', '.join(valid)}; newer keys need their [section]."
            )
        section, field = target[key]
        grouped[section][field] = _parse_value(section, field, entry, source)
        lines[section][field] = entry.line
    if "calibrate_path" in grouped["data_preprocess_param"]:
        grouped["data_preprocess_param"]["input_type"] = _legacy_input_type(
            grouped["data_preprocess_param"]["calibrate_path"], source
        )
    # Messages speak of our key names; say which legacy key they came from.
    try:
        return _build(grouped, lines, source)
    except ConfigError as err:
        message = str(err)
        for key, (_, field) in target.items():
            message = message.replace(f"`{field}`", f"`{field}` (from `{key}`)")
        raise ConfigError(message) from None


def _legacy_input_type(paths: str, source: str) -> str:
    """r1.x calibration folders held ready-made `.bin` buffers; images are accepted too."""
    names: list[str] = []
    for part in paths.split(","):
        name, sep, rest = part.strip().partition(":")
        folder = pathlib.Path(rest if sep else name)
        if folder.is_dir():
            names.extend(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return "BIN" if names and all(n.lower().endswith(".bin") for n in names) else "IMAGE"


def is_flat_config(path: str | os.PathLike[str]) -> bool:
    """True for an r1.x converter config: keys but no `[section]` headers."""
    try:
        sections, loose = _split_lines(pathlib.Path(path).read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return False
    return bool(loose) and not sections


def _all_keys() -> list[str]:
    return [k for s in SECTIONS for k in _field_names(s)]


def read_config(path: str | os.PathLike[str]) -> QuantConfig:
    """Reads a MindSpore Lite converter config file.

    Example:
        >>> cfg = read_config("examples/configs/full_quant_cpu.cfg")
        >>> cfg.full_quant_param.activation_quant_method
        'MAX_MIN'
    """
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(p)!r} is a folder, not a file.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: {err}.") from None
    return parse_config(text, str(p))


# --- writing -------------------------------------------------------------------------------


def _format_value(section: str, key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        if _annotation(section, key) == "tuple[float, ...]":
            return "[" + ", ".join(repr(float(v)) for v in value) + "]"
        for name in value:
            if "," in name or "\n" in name or name != name.strip():
                raise ConfigError(
                    f"[{section}] `{key}` entry {name!r} cannot be written to an INI file: "
                    "names there are comma-separated and stripped."
                )
        return ",".join(value)
    text = repr(value) if isinstance(value, float) else str(value)
    if "\n" in text or text != text.strip():
        raise ConfigError(
            f"[{section}] `{key}` = {value!r} cannot be written to an INI file (line breaks "
            "or surrounding spaces)."
        )
    return text


def format_config(config: QuantConfig) -> str:
    """The config as INI text that `parse_config` reads back to an equal config."""
    out = ["# MindSpore Lite converter config, written by jaxptq."]
    for section, cls in SECTIONS.items():
        obj = getattr(config, section)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out += ["", f"# {doc}", f"[{section}]"]
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if value is None:
                continue  # absent means None (the default) when read back
            if value == () and f.default == ():
                continue
            out.append(f"{f.name}={_format_value(section, f.name, value)}")
    return "\n".join(out) + "\n"


def write_config(config: QuantConfig, path: str | os.PathLike[str]) -> None:
    """Writes `config` as a converter config file, atomically (temp file, then rename)."""
    atomic.write_bytes(path, format_config(config).encode("utf-8"))
