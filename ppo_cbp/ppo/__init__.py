"""What the PPO trainer (``ppo_cbp/train.py``) imports besides the plasticity operators: its
settings' checks and resume rules, the run's seeding, state, checkpoints and summary, the fast
closed-form numerics and the running observation and reward normalisation."""
