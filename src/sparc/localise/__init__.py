"""Text-guided localisation (method.md section 4; docs/localisation.md): heat maps of the image
streams for text queries and their scores (maps, heatmaps), the queries and their masks
(composite, queries), the overlay file the figures and the browser draw (overlays), and the
`localise` stage (stage)."""
