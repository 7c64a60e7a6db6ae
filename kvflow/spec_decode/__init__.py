"""Speculative decoding: proposers (n-gram prompt lookup, a draft model), verification of
proposals in the target's own forward, and acceptance metrics."""
