"""Framework-facing adapters: ``torch`` (torch.optim), ``optax``, ``arrays`` (NumPy/CuPy).

Each is imported on demand (``from xpopt.adapters import optax``), so this
package imports no framework.
"""
