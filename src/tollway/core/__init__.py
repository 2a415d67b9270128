"""The pure core of tollway: money, ids, lifecycle, events, decisions, the fold, the ledger.

Nothing here does I/O, reads a clock or draws randomness; everything is a function of its
arguments, so the same log always folds to the same state.
"""
