"""Loading a model: names from torchvision, timm, a ``file.py:factory``, a module, or a library by
prefix (``sources/``: ``yolo:``, ``hf:``, ``smp:``), built offline unless published weights are
asked for (``network``); weights files read without unpickling (``models``); sample inputs of the
right kind and size for a model (``samples``). A saved modified model is read one floor up, in
:mod:`attnsurgeon.saving.saved`, because rebuilding it needs the rewrite.
"""
