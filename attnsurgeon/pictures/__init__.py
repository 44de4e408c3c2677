"""Pictures: the insertion map and profile's cost bars (``plot``), and ``explain``: Grad-CAM
(``gradcam``) and attention gate values (``gates``) of base and modified models on images, drawn as
sheets and a summary (``sheet``).
"""
