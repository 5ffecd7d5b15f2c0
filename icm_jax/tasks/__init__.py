"""Tasks: how records become prompts (templates), labels and consistency keys."""
