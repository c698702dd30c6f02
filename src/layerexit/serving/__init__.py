"""Serving early exit: engines that pool requests layer by layer, an HTTP API, a load generator."""
