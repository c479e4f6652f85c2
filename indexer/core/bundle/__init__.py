"""The bundle format: its file names (`layout`), manifest (`manifest`), item store (`items`), opening and
verifying (`read`), server leases (`leases`) and the inventory of a bundles dir (`inventory`).
The write side (publishing) is the index stage's: `indexer.index.publish`."""
