"""Writing a modified model out, and reading it back: every format in one registry (``formats``), each
file loaded back and checked before it is renamed into place (``export``); the ``.safetensors`` +
recipe format that rebuilds the exact model, and ``load_model``/``load`` for a name or a saved
file (``saved``).
"""
