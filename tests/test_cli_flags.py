"""The command line is generated from the stage configs (sparsekd/cli/_flags.py) and must stay the contract:
every flag the hand-written parser offered (tests/data/cli_flags.json), every command the README shows, and help
text that is the config fields' descriptions (so a default or a meaning cannot drift between them)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from sparsekd.cli import make_parser
from sparsekd.cli._flags import default_text

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = json.loads((Path(__file__).parent / "data" / "cli_flags.json").read_text())

# Flags that are not a stage-config field: the command line's own (output, YAML, kinds of eval, sharding syntax).
NOT_CONFIG = {
    "eval": {"--kind", "--tasks", "--include", "--limit"},
    "prune": {"--out", "--dense-out"},
    "profile": {"--out"},
    "cache": {"--shard"},
    "run": {"flow"},
    "demo": {"--workdir", "--model"},
}
ALWAYS = {"-h", "--help", "--json", "--config"}


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"sparsekd": parser, **sub.choices}


def arity(action: argparse.Action) -> str:
    if not action.option_strings:
        return "positional"
    if action.nargs == 0:
        return "switch"
    return "repeatable value" if isinstance(action, argparse._AppendAction) else "value"


def offered(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {s: arity(a) for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
            for s in a.option_strings or [a.dest]}


def test_every_flag_of_the_hand_written_parser_is_still_offered():
    verbs = verb_parsers()
    expected = {k: v for k, v in SNAPSHOT.items() if not k.startswith("_")}
    assert sorted(verbs) == sorted(expected)
    for verb, flags in expected.items():
        assert offered(verbs[verb]) == flags, verb


def config_backed(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if getattr(a, "backing", None) is not None]


def test_help_of_config_backed_flags_is_the_field_description():
    checked = 0
    for verb, parser in verb_parsers().items():
        for action in config_backed(parser):
            parts = []
            for label, config, name in action.backing.fields:
                info = config.model_fields[name]
                default = default_text(config, name)
                parts.append((f"{label}: " if label else "") + info.description
                             + (f" (default {default})" if default else ""))
            assert action.help.replace("%%", "%") == "; ".join(parts) + action.backing.note, (verb, action.dest)
            checked += 1
    assert checked > 100
    # The defaults as a user types them: from the fields, never typed again.
    helps = {a.option_strings[0]: a.help for a in config_backed(verb_parsers()["distill"])}
    assert helps["--lr"].endswith("(default 2e-05)") and helps["--tail"].endswith("(default topk)")
    assert "(default" not in helps["--max-steps"]  # None: the description says what that means
    profile = {a.option_strings[0]: a.help for a in config_backed(verb_parsers()["profile"])}
    assert "(default 1,16,64)" in profile["--batch-sizes"]
    selfdata = {a.option_strings[0]: a.help for a in config_backed(verb_parsers()["selfdata"])}
    assert selfdata["--filter-answers"].endswith("(default on)")


def test_every_stage_flag_comes_from_a_config_field():
    for verb, parser in verb_parsers().items():
        if verb == "sparsekd":
            continue
        own = {s for a in parser._actions if getattr(a, "backing", None) is None for s in a.option_strings or [a.dest]}
        assert own - ALWAYS == NOT_CONFIG.get(verb, set()), verb


def test_a_literal_field_shows_its_values_and_a_bad_value_names_the_field(capsys, tmp_path):
    from sparsekd.cli import main

    actions = {a.option_strings[0]: a for a in verb_parsers()["distill"]._actions if a.option_strings}
    assert actions["--tail"].metavar == "{topk,bucket,paper,sampled}"
    argv = ["distill", "--student", "smollm2-135m", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    assert main(argv + ["--tail", "nope"]) == 2  # checked by DistillConfig before anything loads
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.tail='nope'" in err[0] and "'sampled'" in err[0]


def test_flags_default_to_none_so_yaml_and_config_defaults_apply():
    args = make_parser().parse_args(["prune", "--model", "m"])
    assert args.whiten is None and args.method is None and args.calibration_samples is None
    assert args.trust_remote_code is None  # a switch that was not given, not False
    args = make_parser().parse_args(["prune", "--model", "m", "--no-whiten", "--target-reduction", "0.1,0.2"])
    assert args.whiten is False and args.target_reduction == [0.1, 0.2]
    args = make_parser().parse_args(["profile", "--model", "a", "--model", "b", "--seq-len", "64,128"])
    assert args.models == ["a", "b"] and args.seq_len == [64, 128]
    args = make_parser().parse_args(["cache", "--model", "m", "--out", "o", "--shard", "1/2", "--format", "1"])
    assert args.shard == (1, 2) and args.format == 1


# ---------------------------------------------------------------------------------------------------------------- README

# Placeholders of the README's synopses, as values the flags' types accept.
PLACEHOLDERS = {"N": "8", "B": "2", "W": "10", "R": "0.15", "TAU": "0.97", "I/N": "0/2"}


COMMAND = re.compile(r"(?:^|\s)(?:\$ )?(?:\S*/)?sparsekd\s+([a-z].*)$")  # `sparsekd VERB ...`, any path, -m too


def readme_commands() -> list[str]:
    """The argument part of every `sparsekd ...` command in the README: its code blocks (a synopsis' continuation
    lines joined) and its inline code."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    lines: list[str] = []
    for block in blocks:
        first = len(lines)
        for line in re.sub(r"\\\n", " ", block).splitlines():  # backslash continuations
            if line[:1].isspace() and len(lines) > first and COMMAND.search(lines[-1]):  # an indented continuation
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]*sparsekd [^`\n]*--[^`\n]*)`", prose)
    found = []
    for line in lines:
        for part in line.split("&&"):
            match = COMMAND.search(part.strip())
            if match:
                found.append(match.group(1).strip())
    return found


def synopsis_variants(command: str) -> list[list[str]]:
    """argv lists for a synopsis: [optional] brackets dropped; of `--x X | --y Y` alternatives the first; of
    `--x/--no-x` the first spelling; placeholders as values of the flags' types; each value of `a|b` in turn."""
    tokens = shlex.split(command.replace("[", " ").replace("]", " "))
    if "+" in tokens:  # "+ every training flag of distill": prose
        tokens = tokens[: tokens.index("+")]
    argv: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "|":  # an alternative to the flag before: skip it and its value
            i += 2
            while i < len(tokens) and not tokens[i].startswith("-") and tokens[i] != "|":
                i += 1
            continue
        i += 1
        if token == "..." and not (argv and argv[-1].startswith("--")):
            continue  # "and more flags"
        argv.append(PLACEHOLDERS.get(token, token.split("/--")[0]))
    variants = [[v.split("|")[0] for v in argv]]
    for i, value in enumerate(argv):
        for choice in value.split("|")[1:]:
            variants.append([v.split("|")[0] if j != i else choice for j, v in enumerate(argv)])
    return variants


def test_readme_commands_are_found():
    verbs = {c.split()[0] for c in readme_commands()}
    assert {"eval", "prune", "cache", "distill", "selfdata", "sft", "profile", "run", "demo"} <= verbs


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    for argv in synopsis_variants(command):
        try:
            make_parser().parse_args(argv)
        except Exception as err:  # noqa: BLE001 - the parser's one-line ConfigError
            pytest.fail(f"README: `sparsekd {command}` as {argv}: {err}")
