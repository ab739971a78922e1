"""What every command line shares: quiet logging by default, flag errors that name the flag.

A command prints its progress bar, its results, warnings and errors; the INFO lines of absl, JAX
(backend probing) and orbax (every checkpoint phase and read rate) stay out of the terminal.
absl's own flags show more: ``--verbosity=0`` (or ``-v 0``) logs INFO to stderr, ``--log_dir=DIR``
writes a log file at INFO (or the given ``--verbosity``) while stderr keeps warnings and errors.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

#: absl verbosity of the terminal unless --verbosity / -v is given: warnings and errors only.
DEFAULT_VERBOSITY = -1


def configure_logging() -> None:
    """Apply the quiet default (call first thing in ``main``, after absl parsed the flags)."""
    verbosity_given = FLAGS["verbosity"].present
    if FLAGS.log_dir:
        if not verbosity_given:
            FLAGS.verbosity = 0  # the file gets INFO
        if not FLAGS["stderrthreshold"].present:
            FLAGS.stderrthreshold = "warning"  # the terminal still sees warnings and errors
        logging.get_absl_handler().use_absl_log_file()
    elif not verbosity_given:
        FLAGS.verbosity = DEFAULT_VERBOSITY


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``, with an override of a
    config key that does not exist (``--config.model.widht=3``) reported like any bad flag, naming
    it: ml_collections raises a bare AttributeError for it from inside the parser."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        message = e
        while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(text))
            message = message.args[0]
        message = str(message)
        found = re.match(r"""^["']*([^"'\n]+)""", message)
        key = found.group(1) if found else ""
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        named = [o for o in overrides if key in o.split(".")[1:]] or overrides
        hint = " ".join(line.strip() for line in message.splitlines()[1:])
        sys.stderr.write(f"FATAL Flags parsing error: {', '.join(named) or '--config'}: unknown config key {key!r}; expected "
                         f"a key of the --config file's get_config() (jdiff.train.config.base_config){'; ' + hint if hint else ''}\n")
        sys.exit(1)


def load_workdir_config(workdir: str):
    """The config of ``--workdir`` (:func:`jdiff.workdir.load_config`), a directory that is not a
    training workdir reported as a usage error of the flag."""
    from jdiff.workdir import load_config

    try:
        return load_config(workdir)
    except ValueError as e:
        message = str(e)
        raise app.UsageError("--" + message if message.startswith("workdir: ") else f"--workdir: {workdir!r}: {message}") from None
