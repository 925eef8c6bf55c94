"""What the PPO trainer (``ppo_cbp/train.py``) imports besides the plasticity operators: its
settings' checks and resume rules, the run's seeding, state, checkpoints and summary, the fast
closed-form numerics and the running observation and reward normalisation. None of them imports
the trainer: they read its settings and agent as the protocols of :mod:`ppo_cbp.ppo.protocols`."""
