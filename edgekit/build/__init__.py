"""The build: typed stages over one build state, gates, manifest and bundle writer."""
