"""What every command line shares: quiet logging by default.

A command prints its progress bar, its results, warnings and errors; the INFO lines of absl, JAX
(backend probing) and orbax (every checkpoint phase and read rate) stay out of the terminal.
absl's own flags show more: ``--verbosity=0`` (or ``-v 0``) logs INFO to stderr, ``--log_dir=DIR``
writes a log file at INFO (or the given ``--verbosity``) while stderr keeps warnings and errors.
"""

from __future__ import annotations

from absl import flags, logging

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
