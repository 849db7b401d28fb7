"""Reports a reviewer opens first: metrics, plots and overlays of predictions on their images, in HTML."""
