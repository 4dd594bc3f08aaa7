"""vendgate test suite: pure, component and integration tiers."""
