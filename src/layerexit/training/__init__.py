"""Training: the one loop, resumable checkpoints, data-parallel runs, retrofit.

The methods it trains are entries of :mod:`layerexit.methods`.
"""
