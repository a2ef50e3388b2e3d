"""The inference engine that `hndsr serve` and `hndsr predict` share: the tile plan, batching, admission and deadlines,
the start-up checks that choose the arithmetic, model loading with weight verification, and batch prediction of
files and scenes. Imports `hndsr` and `registry.store`, never `serving`."""
