"""Model definitions shipped with edgekit and the import of user models."""
