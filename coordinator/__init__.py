"""tierserve coordinator role."""
