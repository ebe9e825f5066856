"""DeepSeek-V3-small-like (DeepSeek-AI 2024, "DeepSeek-V3"; sizes near DeepSeek-V2-Lite): 24
layers, d_model 2048, 16 heads; in every layer 2 shared SwiGLU experts and 64 fine-grained routed
ones, all of width 1408, top-6 of the routed experts by sigmoid affinity with group-limited routing
(8 groups, the best 4), routed scaling 2.5, the auxiliary-loss-free bias balancing and the
sequence-wise balance loss; 129,280-entry vocabulary. Standard multi-head attention (no MLA) and
MoE in every layer (DeepSeek keeps its first layer dense): 14.6B parameters, 2.6B active per token
(embeddings included). bf16 compute, f32 parameters, remat and scanned layers; C4 (``c4/en``).

Preflight on any machine (compiles the step for the slice and says whether it fits):

  python -m moejax.preflight --config=experiments/pod/deepseek_v3_small.py:slice=v5p-64 --topology=v5p:2x4x4

On a slice (``slice`` = v5p-64 | v6e-256 | v5e-256; the topology is in experiments/pod/slices.py):

  bash tpu_scripts/create.sh --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --wait
  bash tpu_scripts/setup.sh
  bash tpu_scripts/run.sh --config=experiments/pod/deepseek_v3_small.py:slice=v5p-64 --topology=v5p:2x4x4 \
    -- --config.tokenizer=hf:/path/to/tokenizer.json --config.data_dir=gs://BUCKET/tfds

``vocab_size`` fixes the embedding size (the preflight uses it and never reads the tokenizer file).
"""

import ml_collections

from experiments.pod import slices

# mesh (data, fsdp, expert, tensor) and global batch (sequences of 4096 tokens) per slice. Preflight:
# on v5e-256, 512 sequences need 16.29 GiB per device (16 GiB HBM), 256 need 9.0 GiB (the batch is
# split over all 256 devices, so it is a multiple of 256).
LAYOUTS = {
    "v5p-64": (dict(data=1, fsdp=4, expert=8, tensor=1), 256),
    "v6e-256": (dict(data=1, fsdp=32, expert=8, tensor=1), 512),
    "v5e-256": (dict(data=1, fsdp=32, expert=8, tensor=1), 256),
}


def get_config(arg=None):
    args = slices.parse(arg, "deepseek_v3_small.py", dict(slice="v5p-64"))
    mesh, batch_size = LAYOUTS[args["slice"]]
    config = slices.common(ml_collections.ConfigDict(), args["slice"], mesh=mesh,
                           batch_size=batch_size)
    config.tokenizer = "hf:tokenizer.json"
    config.vocab_size = 129280
    config.seq_len = 4096
    config.num_train_steps = 100_000
    config.seed = 0
    config.router_bias_update_rate = 1e-3
    config.model = dict(d_model=2048, num_layers=24, num_heads=16, d_ff=1408, moe_every=1,
                        activation="silu", rope_base=10_000.0, dtype="bfloat16",
                        param_dtype="float32", remat=True, scan_layers=True)
    config.moe = dict(num_experts=64, experts_per_token=6, d_ff=1408, router="deepseek_v3",
                      num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5,
                      num_shared_experts=2, dispatch="dropless", expert="glu",
                      activation="silu", sequence_balance_weight=1e-4)
    return config
