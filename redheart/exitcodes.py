"""The exit codes of `redheart` (and so of run_learning.sh), and which errors are the user's.

    0    done (validate: every check passed)
    1    an internal error (its traceback in the run's log file, or with --debug); validate:
         a check failed
    2    a usage error: a bad flag, value, path, data file or checkpoint, said in one line
    4    out of memory and nothing left to try (halving the micro-batch, the swap manager); the
         last state is kept, resumable
    5    train.max_bad_steps optimizer steps in a row with a non-finite loss or gradient; the
         last good state is kept
    75   stopped cleanly (a signal, a failed write); resume with --resume latest (EX_TEMPFAIL)
    130  interrupted before the run could stop cleanly (the shell's 128 + SIGINT)
"""
from __future__ import annotations

import sys

OK = 0
INTERNAL = 1
USAGE = 2
OUT_OF_MEMORY = 4
NOT_FINITE = 5
STOPPED = 75
INTERRUPTED = 130

# The errors that mean "the input is wrong" (exit code USAGE), each with a message for the
# user: module -> class.
USER_ERRORS = {"redheart.overrides": "ConfigError", "redheart.ckpt.io": "CheckpointError",
               "redheart.data.schema": "DataError", "redheart.model.encoder": "EncoderError",
               "redheart.run": "UsageError"}


def user_error_types() -> tuple[type, ...]:
    """The classes of USER_ERRORS among the loaded modules (an error raised was loaded with its
    module): so that a bad flag fails before torch is imported."""
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)
