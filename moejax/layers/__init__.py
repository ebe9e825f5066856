"""flax.nnx building blocks of the MoE layer: ``MoEConfig``, ``Router``, ``Experts``, ``MoE``."""
