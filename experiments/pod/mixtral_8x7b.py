"""Mixtral-8x7B-like (Jiang et al. 2024): 32 layers, d_model 4096, 32 heads, 8 SwiGLU experts of
width 14,336 in every layer, top-2 Mixtral routing (softmax over the two chosen logits) with a
load-balancing loss; 32,000-entry vocabulary; grouped-query attention with 8 key/value heads, as
Mixtral's: 46.7B parameters, 12.9B active per token (embeddings included). bf16 compute, f32 parameters, remat and
scanned layers; C4 (``c4/en``).

Preflight on any machine (compiles the step for the slice and says whether it fits):

  python -m moejax.preflight --config=experiments/pod/mixtral_8x7b.py:slice=v5p-64 --topology=v5p:2x4x4

On a slice (``slice`` = v5p-64 | v6e-256 | v5e-256; the topology is in experiments/pod/slices.py):

  bash tpu_scripts/create.sh --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --wait
  bash tpu_scripts/setup.sh
  bash tpu_scripts/run.sh --config=experiments/pod/mixtral_8x7b.py:slice=v5p-64 --topology=v5p:2x4x4 \
    -- --config.tokenizer=sentencepiece:/path/to/tokenizer.model --config.data_dir=gs://BUCKET/tfds

``vocab_size`` fixes the embedding size (the preflight uses it and never reads the tokenizer file).
"""

import ml_collections

from experiments.pod import slices

# mesh (data, fsdp, expert, tensor) and global batch (sequences of 4096 tokens) per slice: the
# experts over ``expert``, their D over ``fsdp``; on v5e (16 GiB) F, heads and vocabulary split too.
# The batches are what the preflight says fits: on v5p-64, 128 sequences need 103 GiB per device
# (95 GiB HBM), 64 need 71.5; on v5e-256, 256 need 21.1 GiB (16 GiB HBM), 128 need 15.4.
LAYOUTS = {
    "v5p-64": (dict(data=1, fsdp=4, expert=8, tensor=1), 64),
    "v6e-256": (dict(data=1, fsdp=32, expert=8, tensor=1), 256),
    "v5e-256": (dict(data=1, fsdp=16, expert=8, tensor=2), 128),
}


def get_config(arg=None):
    args = slices.parse(arg, "mixtral_8x7b.py", dict(slice="v5p-64"))
    mesh, batch_size = LAYOUTS[args["slice"]]
    config = slices.common(ml_collections.ConfigDict(), args["slice"], mesh=mesh,
                           batch_size=batch_size)
    config.tokenizer = "sentencepiece:tokenizer.model"
    config.vocab_size = 32000
    config.seq_len = 4096
    config.num_train_steps = 100_000
    config.seed = 0
    config.model = dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                        moe_every=1,
                        activation="silu", rope_base=1_000_000.0, dtype="bfloat16",
                        param_dtype="float32", remat=True, scan_layers=True)
    config.moe = dict(num_experts=8, experts_per_token=2, d_ff=14336, router="mixtral",
                      dispatch="dropless", expert="glu", activation="silu",
                      load_balancing_weight=0.01, z_loss_weight=0.0)
    return config
