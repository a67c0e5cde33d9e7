"""Modules that compaction emits where a PyTorch module cannot hold the compacted shape."""
