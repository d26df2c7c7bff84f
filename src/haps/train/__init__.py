"""Training recipes: action-level data collection, the warm-up set, and SFT of the high-level router."""
