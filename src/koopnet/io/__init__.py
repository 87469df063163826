"""Files: artifacts (safetensors + hashed JSON), saving and loading stages, data sets, IDX,
trajectory files and the command line's data sources. Imports the core, never the lab or CLI."""
