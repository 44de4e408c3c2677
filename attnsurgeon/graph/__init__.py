"""Reading a model's graph: the torch.fx tracer (``tracing``), shapes and channel axes on the meta
device (``shapes``, ``layout``), the parts of a model that trace where the whole does not
(``parts``, each rewritten part a ``traced_part.TracedPart``), and the anatomy found in the graph:
blocks, stages and their insertion sites (``anatomy`` composes ``sites``, ``nodes``, ``finders``),
the attention the model already has (``attention``) and the module anchors of
``--after``/``--before`` (``anchors``). ``inspect`` puts loading and reading together. Nothing
here changes the model.
"""
