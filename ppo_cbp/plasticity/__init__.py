"""The plasticity operators, one module per method, and the hook protocol they share
(:mod:`ppo_cbp.plasticity.hooks`).

The method classes and the hook types are importable from here::

    from ppo_cbp.plasticity import ContinualBackprop, L2Init, Methods, Network

Architectural methods are options of the networks: LayerNorm (``layer_norm_mlp``), CReLU
(:class:`ppo_cbp.nets.crelu.CReLU`), deep Fourier features (:class:`ppo_cbp.nets.dff.DFF`),
both re-exported here, and plasticity injection.
"""

from ppo_cbp.nets.crelu import CReLU, crelu_mlp
from ppo_cbp.nets.dff import DFF, dff_mlp
from ppo_cbp.plasticity.c_chain import ChurnReduction
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.hooks import Layer, Methods, Network, PlasticityMethod
from ppo_cbp.plasticity.injection import InjectableNetwork, PlasticityInjection
from ppo_cbp.plasticity.l2_init import L2Init
from ppo_cbp.plasticity.normalize_project import NormalizeAndProject, layer_norm_mlp
from ppo_cbp.plasticity.parseval import ParsevalRegularization
from ppo_cbp.plasticity.redo import ReDo
from ppo_cbp.plasticity.resets import AdamStateReset, LayerReset
from ppo_cbp.plasticity.shrink_perturb import ShrinkPerturb, perturb_
from ppo_cbp.plasticity.trac import TRAC
from ppo_cbp.plasticity.upgd import UPGD, AdaptiveUPGD
from ppo_cbp.plasticity.weight_clipping import WeightClipping

__all__ = [
    "TRAC",
    "UPGD",
    "AdamStateReset",
    "AdaptiveUPGD",
    "CReLU",
    "DFF",
    "ChurnReduction",
    "ContinualBackprop",
    "InjectableNetwork",
    "L2Init",
    "Layer",
    "LayerReset",
    "Methods",
    "Network",
    "NormalizeAndProject",
    "ParsevalRegularization",
    "PlasticityInjection",
    "PlasticityMethod",
    "ReDo",
    "ShrinkPerturb",
    "WeightClipping",
    "crelu_mlp",
    "dff_mlp",
    "layer_norm_mlp",
    "perturb_",
]
