"""Non-stationary environments for the continual reinforcement-learning experiments."""

from envs.friction import FrictionChange, sample_frictions

__all__ = ["FrictionChange", "sample_frictions"]
