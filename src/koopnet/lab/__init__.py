"""Experiments: recipes, the clean and paper protocols, the study, baselines, reports, figures
and the paper's published numbers. Imports the core and io, never the CLI."""
