"""Rewriting the model by a plan: choose each block's site, module and name against the anatomy
(``placing``), edit the traced graph and put it back into the model (``surgery``), then, when asked,
wrap attention gates in memory-efficient segments (``memory``, ``recompute``). ``apply`` composes
the steps into the API: :func:`insert`, :func:`apply_plan`, :func:`optimize`.
"""
