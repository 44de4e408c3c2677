"""Shared vocabulary, below everything else: the one exception type users see (``errors``),
atomic files (``files``), the op tables that say what an fx node is (``ops``), the insertion
positions and which kind of block may go where (``positions``), quieting native libraries
(``native``), the one parser of a comma-separated list (``lists``), what a forward leaves on its
modules (``module_state``) and the version. Nothing here imports another folder.
"""
