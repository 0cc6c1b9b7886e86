"""What the notebooks draw: ipywidgets panels and matplotlib figures (the core never imports these)."""
