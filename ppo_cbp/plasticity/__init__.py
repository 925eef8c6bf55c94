"""The plasticity operators, one module per method, and the hook protocol they share
(:mod:`ppo_cbp.plasticity.hooks`)."""
