"""Plain-Python formulas the router tests write their expectations with (lists of floats, no torch)."""
import math


def softmax(values):
    """softmax of a list of numbers, as a list."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def ranked(scores):
    """Expert ids by descending score, ties to the lower id."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))
