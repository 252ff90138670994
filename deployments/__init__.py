"""deployments: see README.md in this folder."""
