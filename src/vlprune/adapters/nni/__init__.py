"""NNI 3.0 bridge: vlprune criteria as NNI pruners, and NNI masks made into a really smaller model.

NNI's own ``ModelSpeedup`` fails on torch 2.x (a tracer error, NNI issue 5768), so
:func:`vlprune.adapters.nni.shrink.shrink` removes masked channels, heads and layers through
Torch-Pruning's dependency graph and :func:`vlprune.sync_hf_model` instead.

Needs the ``nni`` extra: ``pip install -e ".[nni]"``.
"""
