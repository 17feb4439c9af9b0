// Filled in by the expert-server work.
