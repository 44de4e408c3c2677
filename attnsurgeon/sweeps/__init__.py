"""Sweeps: many configurations (and models) profiled one row at a time, resumable, on this
machine or as Ray tasks, written as rows, a table and a plot (``runner``).
"""
