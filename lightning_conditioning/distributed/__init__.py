"""Work over processes.

- ``collectives``: a ``reduce`` callable for any launcher (Lightning strategies, Fabric,
  ``torch.distributed``).
- ``shards``: norms of FSDP2-sharded (``DTensor``) weights without gathering them.
"""
