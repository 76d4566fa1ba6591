"""`python -m divdistill_jax.main` with test hooks, for subprocess tests.

Environment variables:
  SLOW_STEP: seconds to sleep before each training batch, so a signal sent
    by the test lands mid-run (the batch order, hence the result, is
    unchanged).
  KILL_AT_SAVE: a checkpoint step; the process SIGKILLs itself after that
    checkpoint's files are written but before orbax commits (renames) it.
"""

import os
import signal
import time

from orbax.checkpoint._src.path import atomicity

from divdistill_jax import data, main

_slow = float(os.environ.get("SLOW_STEP", "0"))
_kill_at = os.environ.get("KILL_AT_SAVE")

if _slow:
  _batch_indices = data.batch_indices

  def _slow_batch_indices(*args, **kwargs):
    time.sleep(_slow)
    return _batch_indices(*args, **kwargs)

  data.batch_indices = _slow_batch_indices

if _kill_at:
  _finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def _crashing_finalize(self, *args, **kwargs):
    if self._final_path.name == _kill_at:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGKILL)
    return await _finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = _crashing_finalize

if __name__ == "__main__":
  main.run()
