"""Kron's memory / compute plan for a small GPT-like model, before allocating anything.

    python benchmarks/kron_plan.py [--d 768] [--layers 2] [--vocab 8192] [--dtype bfloat16] [--mu-dtype bfloat16]

Prints, per parameter, the layout ``Kron.plan()`` chose, its state bytes and
the FLOPs of one step with and without a preconditioner fit, and the totals
against AdamW (float32 ``exp_avg`` + ``exp_avg_sq``).  Nothing is allocated:
the plan needs shapes only (torch ``meta`` tensors here).
"""

from __future__ import annotations

import argparse


def gpt_shapes(d: int, layers: int, vocab: int, ctx: int = 1024) -> list[tuple[str, tuple]]:
    shapes = [("wte", (vocab, d)), ("wpe", (ctx, d))]
    for i in range(layers):
        shapes += [(f"h{i}.ln1", (d,)), (f"h{i}.attn.qkv", (3 * d, d)), (f"h{i}.attn.proj", (d, d)),
                   (f"h{i}.ln2", (d,)), (f"h{i}.mlp.up", (4 * d, d)), (f"h{i}.mlp.down", (d, 4 * d))]
    return shapes + [("ln_f", (d,)), ("lm_head", (vocab, d))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", help="factors (default: %(default)s)")
    ap.add_argument("--mu-dtype", default="bfloat16",
                    help="momentum (default: %(default)s; 'none': Kron's default, float32 for float32 params)")
    args = ap.parse_args(argv)

    import torch

    from xpopt.adapters.torch import Kron

    named = gpt_shapes(args.d, args.layers, args.vocab)
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for _, s in named]
    mu = None if args.mu_dtype.lower() == "none" else getattr(torch, args.mu_dtype)
    opt = Kron(params, dtype=getattr(torch, args.dtype), mu_dtype=mu)
    rows = opt.plan()
    print(f"Kron plan, GPT-like d={args.d}, {args.layers} layers, vocab {args.vocab}, factors {args.dtype}, "
          f"momentum {args.mu_dtype}\n")
    print("| param | shape | layout | state MB | AdamW MB | GFLOP fit step | GFLOP plain step |")
    print("|---|---|---|---|---|---|---|")
    tot = dict(state_bytes=0, adamw_bytes=0, flops_fit=0, flops_apply=0)
    for (name, shape), r in zip(named, rows):
        for k in tot:
            tot[k] += r[k]
        print(f"| {name} | {shape} | {r['layout']} | {r['state_bytes'] / 1e6:.2f} | {r['adamw_bytes'] / 1e6:.2f} | "
              f"{r['flops_fit'] / 1e9:.2f} | {r['flops_apply'] / 1e9:.3f} |")
    print(f"| **total** | | | **{tot['state_bytes'] / 1e6:.1f}** | **{tot['adamw_bytes'] / 1e6:.1f}** | "
          f"**{tot['flops_fit'] / 1e9:.1f}** | **{tot['flops_apply'] / 1e9:.2f}** |")
    print(f"\nstate / AdamW = {tot['state_bytes'] / tot['adamw_bytes']:.2f}")


if __name__ == "__main__":
    main()
