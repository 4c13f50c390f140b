//! Local index tools: index a layer blob on disk, inspect an index, read a file through an index.
