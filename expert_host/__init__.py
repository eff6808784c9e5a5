"""tierserve expert_host role."""
