"""One module per backend compiler, and the registry that names them."""
