"""Search over sequences of passes: the space, the scoring, the algorithms, recipes."""
