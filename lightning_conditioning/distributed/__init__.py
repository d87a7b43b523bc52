"""Work over processes.

- ``collectives``: a ``reduce`` callable for any launcher (Lightning strategies, Fabric,
  ``torch.distributed``).
- ``owners``: each layer's dense moments reduced to one owner rank, which solves them.
- ``shards``: norms of FSDP2-sharded (``DTensor``) weights without gathering them.
"""
