"""The build's stages, one module each: data → import → export → quantize → evaluate → package."""
