"""ferrun: a torchrun-compatible launcher and collective runtime.

``import ferrun.torch`` registers ferrun's collectives as the torch.distributed backend
``"ferrun"``.
"""
