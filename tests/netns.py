"""The two-namespace harness for multi-node tests (it lives in ``distopt.bench._netns``, which
``distopt bench zero --nodes 2`` uses too); see that module for what it makes and removes."""

from distopt.bench._netns import PREFIX, SUBNET, TwoNodes, unavailable_reason

__all__ = ["PREFIX", "SUBNET", "TwoNodes", "unavailable_reason"]
