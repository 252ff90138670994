"""`sparsekd <verb>`: a table from verb to the module that runs it (stage verbs call sparsekd_core, run/demo flows).

Every stage verb's flags are generated from its pydantic stage configs (``_flags.py``): names, types, defaults and
help live once, in ``sparsekd_core/config.py``. Every verb takes ``--json`` and then prints one JSON object as its
last stdout line; progress and logs go to stderr. Bad input (a config value, a missing file, an unknown alias) is
one line on stderr and exit code 2. A write that found the disk full (or the quota used up) is one line, "no space
left on device writing <path>", and exit code 74 (``EXIT_NO_SPACE``, sysexits' EX_IOERR): not bad input, not a
crash; free space and run again (stages resume).
"""

from __future__ import annotations

import sys
from typing import Callable

from ._common import EXIT_BAD_INPUT, Parser
from .cache import add_cache_parser
from .distill import add_distill_parser
from .eval import add_eval_parser
from .profile import add_profile_parser
from .prune import add_prune_parser
from .run import add_demo_parser, add_run_parser
from .selfdata import add_selfdata_parser
from .sft import add_sft_parser

__all__ = ["EXIT_BAD_INPUT", "EXIT_NO_SPACE", "VERBS", "add_run_parser", "main", "make_parser"]

EXIT_NO_SPACE = 74  # sysexits.h EX_IOERR

VERBS: list[Callable] = [add_eval_parser, add_cache_parser, add_distill_parser, add_prune_parser, add_profile_parser,
                         add_selfdata_parser, add_sft_parser, add_run_parser, add_demo_parser]


def make_parser() -> Parser:
    parser = Parser(prog="sparsekd", description="Structured SVD pruning + self-referential KD, as experiments.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sparsekd_core.config import ConfigError
    from sparsekd_core.data import DataQualityError, DataUnavailableError
    from sparsekd_core.distill import DistillError
    from sparsekd_core.files import disk_full_message
    from sparsekd_core.models import ModelLoadError

    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        return args.func(args)
    except (ConfigError, ModelLoadError, DataQualityError, DataUnavailableError, DistillError) as err:
        print(f"sparsekd: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sparsekd: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only a full disk is mapped here; anything else keeps its traceback
        no_space = disk_full_message(err)
        if no_space is None:
            raise
        print(f"sparsekd: error: {no_space}", file=sys.stderr)
        return EXIT_NO_SPACE
