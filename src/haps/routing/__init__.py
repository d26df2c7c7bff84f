"""Routing: the four-part routing prompt, the assignment space, and the routers (high-level router,
simple fixed/random routers, and the registry later baselines extend)."""
