"""Experiment scripts over the product's functions (issue 15): each writes a JSON of results beside it.

Nothing in the product imports from here.
"""
