"""The command lines of the installed package (``ppo-cbp-supervised``, ``ppo-cbp-plot``,
``ppo-cbp-sweep``); ``scripts/supervised.py``, ``plot.py`` and ``sweep.py`` run them from a
checkout. ``ppo-cbp-train`` is ``ppo_cbp/train.py``'s ``cli``."""
