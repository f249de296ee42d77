"""Imported at start-up by the processes of a run that a test launches with this folder on PYTHONPATH (see
tests.runs.PAUSE_AFTER_CHECKPOINT): the process that completes checkpoint directory $PAUSE_AFTER_CHECKPOINT (the
rename of step_N.partial to step_N) stops itself (SIGSTOP) right after, so that the test kills the run at exactly
that point. It relies only on the on-disk layout: a checkpoint is complete once its directory has its final name."""

import os
import signal

_target = os.environ.get("PAUSE_AFTER_CHECKPOINT")
if _target:
    _replace = os.replace

    def _replace_then_pause(src, dst, **kwargs):
        _replace(src, dst, **kwargs)
        if os.fspath(dst) == _target:
            os.kill(os.getpid(), signal.SIGSTOP)

    os.replace = _replace_then_pause
