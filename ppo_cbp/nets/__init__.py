"""The networks and their unit model: which rows and columns make a unit (:mod:`.units`), the fused
CPU kernels, the stacked networks that train many seeds in lockstep (MLP, ``nn.Sequential``,
ResNet-18), the paper's ResNet-18, online normalisation and CReLU."""
