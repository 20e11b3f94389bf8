"""Conformance suite: the simulator and real vLLM, checked by the same tests.

(A package, so its engines stop when it ends.)
"""
