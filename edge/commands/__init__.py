"""One module per CLI command group, imported only when that command runs."""
