"""What every verb shares: the one-line usage error, --config/--json, config sections from YAML + flags, output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sparsekd_core.config import ConfigError, ModelConfig, build, load_yaml

from ._flags import Section, section_names

EXIT_BAD_INPUT = 2
MODEL = Section("model", ModelConfig)  # --model --dtype --device --revision --trust-remote-code


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def config_help(sections: tuple[Section, ...]) -> str:
    return f"YAML file with sections {section_names(sections)} (flags override it)"


def add_output_flags(p: argparse.ArgumentParser, config: str | None) -> None:
    """--config (with this help; None: the verb takes no YAML) and --json, last in a verb's help."""
    if config:
        p.add_argument("--config", help=config)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def sections(args: argparse.Namespace, wanted: tuple[Section, ...]) -> dict[str, dict[str, Any]]:
    """Config sections from --config YAML, overridden by the flags the user gave (None = not given)."""
    loaded = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = [s.name for s in wanted]
    unknown = set(loaded) - set(names)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; allowed: {sorted(names)}")
    values: dict[str, dict[str, Any]] = {}
    for section in wanted:
        values[section.name] = dict(loaded.get(section.name) or {})
        for name in section.config.model_fields:
            value = getattr(args, name, None)
            if value is not None:
                values[section.name][name] = value
    return values


def require_model(values: dict[str, dict[str, Any]], model_flag: str = "--model") -> None:
    if "model" not in values["model"]:
        raise ConfigError(f"model.model: required; give {model_flag} (e.g. {model_flag} smollm2-135m)")


def configs(args: argparse.Namespace, stage: Section, required: tuple[str, ...] = (),
            model_flag: str = "--model") -> tuple[ModelConfig, Any]:
    """The model config and the verb's stage config from flags and --config, with the required fields checked
    first (one line each, exit 2)."""
    values = sections(args, (MODEL, stage))
    require_model(values, model_flag)
    for name in required:
        if name not in values[stage.name]:
            raise ConfigError(f"{stage.name}.{name}: required; give --{name.replace('_', '-')}")
    return build(ModelConfig, "model", values["model"]), build(stage.config, stage.name, values[stage.name])


def emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(human)


def progress(desc: str, unit: str):
    """A progress-bar factory (``factory(total)``) on stderr; off when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)


def dtype_name(loaded) -> str:
    return str(loaded.dtype).removeprefix("torch.")
