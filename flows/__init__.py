"""flows: see README.md in this folder."""
