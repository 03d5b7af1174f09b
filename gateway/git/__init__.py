"""Git itself: the repositories, their hooks, the git binary and the bytes it moves."""
