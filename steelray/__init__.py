"""steelray: steel-surface defect models on Ray."""
