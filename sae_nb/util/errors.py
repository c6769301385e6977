"""The package's one error family: every error sae_nb raises on purpose derives from
:class:`SaeNbError`.

The policy, for every module:

- Bad input (a missing file or column, a wrong shape, an unknown site, a corrupt or hostile file,
  an interrupted run) raises an error of this family, never a bare traceback from deep inside.
- Its message names the value that is wrong and says the fix (the option to pass, the command to
  run, the file to delete).
- Each error also keeps its builtin base: ``ValueError`` for a bad value, ``RuntimeError`` for a
  state that cannot go on, ``OSError`` for a held lock. Code that catches those still works, and a
  notebook catches them all with ``except sae_nb.SaeNbError``.
"""

from __future__ import annotations


class SaeNbError(Exception):
    """Base of every error sae_nb raises on purpose; see the module's policy."""
