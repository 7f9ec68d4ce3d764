"""One visual convention for every picture: the report's plotly figures and the command line's PNGs.

An *effect* is ``loss without - loss with`` (positive: the example or occurrence helped).
Both libraries' ``RdBu`` map the low end to red and the high end to blue, so with the
colour scale centred at 0 a **helpful** effect is **blue** and a harmful one red,
in the HTML heat map and in ``influence-over-time --plot`` alike.
"""

EFFECT_COLORMAP = "RdBu"
"""Diverging colour map name, valid in matplotlib and plotly: low (hurt) red, high (helped) blue."""

EFFECT_LEGEND = "blue: the example helped (the loss is higher without it); red: it hurt"
"""How captions spell the convention."""
