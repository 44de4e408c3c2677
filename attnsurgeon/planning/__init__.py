"""Planning as data, torch-free: what to insert where (``schema``: :class:`InsertionSpec` and its one
checker), the profile settings (``settings``), and recipe files that hold both (``recipes``). The
CLI, recipes, sweeps and the rewrite validate through the same functions.
"""
