"""Conformance suite: the simulator and real vLLM, checked by the same tests (a package so its engines stop when it ends)."""
