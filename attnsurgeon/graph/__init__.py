"""Reading a model's graph: the torch.fx tracer (``tracing``; the GraphModule it makes, its one input
and the state it carries: ``graph_module``), shapes and channel axes on the meta device (``shapes``,
``layout``), the parts of a model that trace where the whole does not (``parts``: which submodules
and their sample inputs in ``part_targets``, the rewritten parts put back into the model in
``part_embed``, each a ``traced_part.TracedPart``), and the anatomy found in the graph: blocks,
stages and their insertion sites (``anatomy`` composes ``sites``, ``nodes``, ``finders``), the
attention the model already has (``attention``) and the module anchors of ``--after``/``--before``
(``anchors``). ``inspect`` puts loading and reading together. Nothing here changes a model it is
given; one thing here makes a model: ``part_embed`` builds a shallow copy of the model around its
rewritten parts (and ``base_like`` around its traced ones), leaving the original as it was.
"""
