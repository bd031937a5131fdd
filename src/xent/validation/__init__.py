"""The validation layer: the public arguments, checked in torch's order and with torch's exception types,
turned into typed problems (problems.py) that the ops take.

cross_entropy.py: cross-entropy, NLL, linear cross-entropy, the vocab-parallel options and the per-token
statistics; distill.py: the linear distillation losses. The checks also needed by the ops at run time live
below both, in checks.py.
"""
