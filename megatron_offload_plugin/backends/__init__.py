"""Devices the plugin can run Megatron-core on besides the one it was written for.

``cpu``: the CPU stands in for "the CUDA device" (see :mod:`.cpu`).  It lives
here rather than in ``testing/`` because the product uses it: the main job
(``scripts/pretrain_gpt.py``) turns it on when a machine has no GPU.
"""
