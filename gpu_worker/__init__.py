"""tierserve gpu_worker role."""
