"""Device profiles shipped inside the edgekit wheel as package data (imported as ``edgekit._targets``)."""
