"""OLMoE-1B-7B-like (Muennighoff et al. 2024): 16 layers, d_model 2048, 64 fine-grained SwiGLU
experts of width 1024 in every layer, top-8 softmax routing (not renormalised) with load-balancing
and router z-losses; 6.9B parameters, 1.3B active per token (embeddings included). bf16 compute,
f32 parameters, remat and scanned layers; C4 (``c4/en``) with a 50,304-entry subword vocabulary.

Preflight on any machine (compiles the step for the slice and says whether it fits):

  python -m moejax.preflight --config=experiments/pod/olmoe_1b_7b.py:slice=v5p-64 --topology=v5p:2x4x4

On a slice (``slice`` = v5p-64 | v6e-256 | v5e-256; the topology is in experiments/pod/slices.py):

  bash tpu_scripts/create.sh --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --wait
  bash tpu_scripts/setup.sh
  bash tpu_scripts/run.sh --config=experiments/pod/olmoe_1b_7b.py:slice=v5p-64 --topology=v5p:2x4x4 \
    -- --config.tokenizer=hf:/path/to/tokenizer.json --config.data_dir=gs://BUCKET/tfds

``tokenizer`` names the tokenizer the data is encoded with (an HF ``tokenizer.json`` or a
``sentencepiece:<path>`` model); ``vocab_size`` fixes the embedding size (the preflight uses it and
never reads the tokenizer file).
"""

import ml_collections

from experiments.pod import slices

# mesh (data, fsdp, expert, tensor) and global batch (sequences of 4096 tokens) per slice.
LAYOUTS = {
    "v5p-64": (dict(data=1, fsdp=4, expert=8, tensor=1), 256),
    "v6e-256": (dict(data=1, fsdp=32, expert=8, tensor=1), 512),
    "v5e-256": (dict(data=1, fsdp=32, expert=8, tensor=1), 512),
}


def get_config(arg=None):
    args = slices.parse(arg, "olmoe_1b_7b.py", dict(slice="v5p-64"))
    mesh, batch_size = LAYOUTS[args["slice"]]
    config = slices.common(ml_collections.ConfigDict(), args["slice"], mesh=mesh,
                           batch_size=batch_size)
    config.tokenizer = "hf:tokenizer.json"
    config.vocab_size = 50304
    config.seq_len = 4096
    config.num_train_steps = 100_000
    config.seed = 0
    config.model = dict(d_model=2048, num_layers=16, num_heads=16, d_ff=1024, moe_every=1,
                        activation="silu", rope_base=10_000.0, dtype="bfloat16",
                        param_dtype="float32", remat=True, scan_layers=True)
    config.moe = dict(num_experts=64, experts_per_token=8, d_ff=1024, router="top_k",
                      renormalize=False, dispatch="dropless", expert="glu", activation="silu",
                      load_balancing_weight=0.01, z_loss_weight=1e-3)
    return config
