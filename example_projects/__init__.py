"""Example Lightning projects that use lightning-conditioning (see each folder's README)."""
