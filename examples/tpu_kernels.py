"""The Pallas TPU kernels behind two flags, checked against the pure-JAX paths.

    python examples/tpu_kernels.py

``model.configure(attention="splash")`` runs prefill attention inside ring steps through the splash
kernel; ``decode_attention="ragged"`` runs each decode step's attention through the ragged decode
kernel, which reads only the cache blocks that hold a sequence's tokens. On a TPU they compile with
Mosaic; here, on CPU, they run in the Pallas interpreter (slowly), which is how their numerics are
checked. A tiny random model with head_dim 128 (what the kernels take), on 4 simulated devices.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import numpy as np  # noqa: E402

import internlm_jax as ij  # noqa: E402


def main():
    cfg = ij.InternLM2Config(vocab_size=256, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = ij.InternLM2(cfg, mesh=ij.make_mesh(sequence=2, tensor=2, fsdp=1), seed=0)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 256, 300)), list(rng.randint(3, 256, 12))]  # one short: mostly padding
    kw = dict(max_new_tokens=6, stop_ids=())
    plain = ij.generate_ids(model, prompts, **kw)
    model.configure(attention="splash", decode_attention="ragged")
    kernels = ij.generate_ids(model, prompts, **kw)
    print("pure JAX:     ", plain)
    print("Pallas kernels:", kernels)
    print("same tokens:", plain == kernels)
    if plain != kernels:
        raise SystemExit("the kernel path made different tokens from the pure-JAX path")


if __name__ == "__main__":
    main()
