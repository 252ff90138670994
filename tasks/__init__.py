"""tasks: see README.md in this folder."""
